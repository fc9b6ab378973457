#include "longlora/train/checkpoint.h"

#include <fcntl.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <thread>

#include "longlora/common/error.h"
#include "longlora/common/json_file.h"
#include "longlora/common/fs.h"
#include "longlora/io/adapter.h"
#include "longlora/io/tensors.h"
#include "longlora/io/hf_config.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace longlora::train {
namespace {

constexpr int kFormatVersion = 1;

bool is_lora(const std::string& n) {
  return n.find(".lora_A.") != std::string::npos || n.find(".lora_B.") != std::string::npos;
}

void fsync_path(const std::string& p) {
  int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}

void write_text(const std::string& path, const std::string& text) {
  {
    std::ofstream out(path, std::ios::binary);
    out << text;
    out.flush();
    if (!out) throw Error(path + ": write failed (disk full?)");
  }
  fsync_path(path);
}

// Optional pause between files of a save, so a test can kill the process mid-save.
void test_pause() {
  if (const char* ms = std::getenv("LONGLORA_TEST_SAVE_PAUSE_MS"))
    std::this_thread::sleep_for(std::chrono::milliseconds(std::atoi(ms)));
}

json model_fingerprint(const io::ModelConfig& c) {
  return {{"hidden_size", c.hidden_size},
          {"intermediate_size", c.intermediate_size},
          {"num_hidden_layers", c.num_hidden_layers},
          {"num_attention_heads", c.num_attention_heads},
          {"num_key_value_heads", c.num_key_value_heads},
          {"vocab_size", c.vocab_size}};
}

}  // namespace

void save_adapter(const std::string& dir, const NamedTensors& trainable, const RunConfig& cfg) {
  io::AdapterConfig a;
  a.r = cfg.lora.r;
  a.lora_alpha = cfg.lora.alpha;
  a.lora_dropout = cfg.lora.dropout;
  a.target_modules = cfg.lora.targets;
  a.base_model_name_or_path = cfg.model.path;
  std::set<std::string> saved;
  NamedTensors out;
  for (const auto& [name, p] : trainable) {
    out.emplace_back(io::kPeftPrefix + name, p);
    if (!is_lora(name)) {
      // peft names modules_to_save by the module's last name (embed_tokens, norm, ...).
      auto mod = name.substr(0, name.rfind('.'));
      mod = mod.substr(mod.rfind('.') + 1);
      if (saved.insert(mod).second) a.modules_to_save.push_back(mod);
    }
  }
  json j = io::adapter_config_to_json(a);
  write_text((fs::path(dir) / "adapter_config.json").string(), j.dump(2));
  io::save_tensors((fs::path(dir) / "adapter_model.safetensors").string(), out);
}

std::string save_checkpoint(const std::string& output_dir, const model::LlamaForCausalLMImpl& m,
                            const NamedTensors& trainable, torch::optim::Optimizer& opt,
                            const TrainerState& st, const RunConfig& cfg) {
  const std::string name = "checkpoint-" + std::to_string(st.step);
  const fs::path final_dir = fs::path(output_dir) / name;
  const fs::path tmp = fs::path(output_dir) / (".tmp-" + name);
  std::error_code ec;
  remove_tree(tmp.string());
  fs::create_directories(tmp, ec);
  if (ec) throw Error(tmp.string() + ": cannot create: " + ec.message());
  if (cfg.lora.enabled) {
    save_adapter(tmp.string(), trainable, cfg);
  } else {
    NamedTensors all;
    for (const auto& item : m.named_parameters()) all.emplace_back(item.key(), item.value());
    io::save_tensors((tmp / "model.safetensors").string(), all);
    write_text((tmp / "config.json").string(), io::model_config_to_json(m.cfg).dump(2));
    // A full fine-tune's checkpoint is a complete model directory: bring the tokenizer.
    const fs::path tok = fs::path(cfg.model.path) / "tokenizer.model";
    if (!cfg.model.path.empty() && fs::exists(tok)) fs::copy_file(tok, tmp / "tokenizer.model");
  }
  test_pause();
  {
    torch::serialize::OutputArchive ar;
    opt.save(ar);
    ar.write("rng_cpu", at::detail::getDefaultCPUGenerator().get_state());
    if (torch::cuda::is_available())
      ar.write("rng_cuda", at::globalContext().defaultGenerator(torch::Device(torch::kCUDA, 0)).get_state());
    ar.save_to((tmp / "state.pt").string());
    fsync_path((tmp / "state.pt").string());
  }
  test_pause();
  json ts = {{"format_version", kFormatVersion}, {"step", st.step},
             {"cursor", st.cursor},              {"bad_steps", st.bad_steps},
             {"tokens_seen", st.tokens_seen},    {"model", model_fingerprint(m.cfg)},
             // The resolved linear RoPE factor the run trained with (export writes it down).
             {"rope_factor", m.cfg.rope_factor}};
  write_text((tmp / "trainer_state.json").string(), ts.dump(2));
  write_text((tmp / "run_config.json").string(), to_json(cfg).dump(2));
  write_text((tmp / "COMPLETE").string(), "ok\n");
  fsync_path(tmp.string());
  remove_tree(final_dir.string());  // a re-save of the same step replaces it
  fs::rename(tmp, final_dir, ec);
  if (ec) throw Error(final_dir.string() + ": cannot rename checkpoint into place: " + ec.message());
  fsync_path(output_dir);
  return final_dir.string();
}

std::optional<std::string> latest_checkpoint(const std::string& output_dir) {
  if (!fs::is_directory(output_dir)) return std::nullopt;
  static const std::regex re("checkpoint-([0-9]+)");
  int64_t best = -1;
  std::string path;
  for (const auto& e : fs::directory_iterator(output_dir)) {
    std::smatch m;
    const std::string n = e.path().filename().string();
    if (!e.is_directory() || !std::regex_match(n, m, re)) continue;
    if (!fs::exists(e.path() / "COMPLETE")) continue;
    const int64_t s = std::stoll(m[1]);
    if (s > best) {
      best = s;
      path = e.path().string();
    }
  }
  if (best < 0) return std::nullopt;
  return path;
}

void prune_checkpoints(const std::string& output_dir, int64_t keep) {
  static const std::regex re("checkpoint-([0-9]+)");
  std::vector<std::pair<int64_t, fs::path>> done;
  for (const auto& e : fs::directory_iterator(output_dir)) {
    std::smatch m;
    const std::string n = e.path().filename().string();
    if (n.rfind(".tmp-checkpoint-", 0) == 0) {
      remove_tree(e.path().string());
      continue;
    }
    if (e.is_directory() && std::regex_match(n, m, re) && fs::exists(e.path() / "COMPLETE"))
      done.emplace_back(std::stoll(m[1]), e.path());
  }
  std::sort(done.begin(), done.end());
  for (size_t i = 0; i + keep < done.size(); ++i) remove_tree(done[i].second.string());
}

TrainerState load_checkpoint(const std::string& dir, const NamedTensors& trainable,
                             torch::optim::Optimizer& opt, const RunConfig& cfg,
                             const io::ModelConfig& model_cfg) {
  const fs::path d(dir);
  if (!fs::exists(d / "COMPLETE")) throw Error(dir + ": not a complete checkpoint (no COMPLETE marker)");
  const json ts = read_json_file((d / "trainer_state.json").string());
  if (ts.value("format_version", 0) != kFormatVersion)
    throw Error((d / "trainer_state.json").string() + ": format_version " +
                ts.value("format_version", json(nullptr)).dump() + " is not " + std::to_string(kFormatVersion));
  // What must agree for the saved tensors and optimizer state to mean the same thing.
  std::vector<std::string> diffs;
  const json want_model = model_fingerprint(model_cfg);
  for (auto it = want_model.begin(); it != want_model.end(); ++it)
    if (ts["model"].value(it.key(), json(nullptr)) != it.value())
      diffs.push_back("model " + it.key() + " is " + ts["model"].value(it.key(), json(nullptr)).dump() +
                      " there, " + it.value().dump() + " here");
  const json saved = read_json_file((d / "run_config.json").string());
  const json now = to_json(cfg);
  for (const char* k : {"/lora/enabled", "/lora/r", "/lora/alpha", "/lora/targets", "/trainable_params"}) {
    json::json_pointer p(k);
    if (!saved.contains(p) || saved[p] != now[p]) {
      std::string key = std::string(k).substr(1);
      std::replace(key.begin(), key.end(), '/', '.');
      diffs.push_back(key + " is " + (saved.contains(p) ? saved[p].dump() : "missing") + " there, " +
                      now[p].dump() + " here");
    }
  }
  if (!diffs.empty()) {
    std::string msg;
    for (const auto& s : diffs) msg += (msg.empty() ? "" : "; ") + s;
    throw Error(dir + ": checkpoint does not fit the config: " + msg);
  }
  auto tensors = io::load_tensors(
      (d / (cfg.lora.enabled ? "adapter_model.safetensors" : "model.safetensors")).string());
  torch::NoGradGuard ng;
  for (const auto& [name, p] : trainable) {
    const std::string key = cfg.lora.enabled ? io::kPeftPrefix + name : name;
    auto it = tensors.find(key);
    if (it == tensors.end()) throw Error(dir + ": tensor '" + key + "' missing from the checkpoint");
    if (it->second.sizes() != p.sizes())
      throw Error(dir + ": tensor '" + key + "' has another shape than the model's");
    p.copy_(it->second);
  }
  torch::serialize::InputArchive ar;
  ar.load_from((d / "state.pt").string());
  opt.load(ar);
  torch::Tensor rng;
  ar.read("rng_cpu", rng);
  at::Generator cpu = at::detail::getDefaultCPUGenerator();
  cpu.set_state(rng);
  if (torch::cuda::is_available() && ar.try_read("rng_cuda", rng)) {
    at::Generator g = at::globalContext().defaultGenerator(torch::Device(torch::kCUDA, 0));
    g.set_state(rng);
  }
  TrainerState st;
  st.step = ts.at("step").get<int64_t>();
  st.cursor = ts.at("cursor").get<int64_t>();
  st.bad_steps = ts.value("bad_steps", 0);
  st.tokens_seen = ts.value("tokens_seen", 0);
  return st;
}

}  // namespace longlora::train
