#include "longlora/train/checkpoint.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <sstream>
#include <thread>

#include "longlora/common/device.h"
#include "longlora/common/error.h"
#include "longlora/common/json_file.h"
#include "longlora/common/fs.h"
#include "longlora/common/strings.h"
#include "longlora/io/adapter.h"
#include "longlora/io/checksum.h"
#include "longlora/io/export.h"
#include "longlora/io/tensors.h"
#include "longlora/io/hf_config.h"
#include "longlora/model/loader.h"
#include "longlora/train/legacy_state.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace longlora::train {
namespace {

// 2: the optimizer state in optimizer.safetensors. 1: in state.pt (LibTorch's
// archive), still read.
constexpr int kFormatVersion = 2;
constexpr int kLegacyStateVersion = 1;
constexpr const char* kOptimizerFile = "optimizer.safetensors";

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

// A libtorch error's first line (no C++ backtrace) for a one-line message.
std::string first_line(const c10::Error& e) { return longlora::first_line(e.what_without_backtrace()); }

// A run config with its file paths made absolute. Written so into run_config.json:
// export reads the base model from it, and a relative model.path was resolved against
// export's working directory, not the training's. A resume compares configs this way,
// so a relative path (here or in an older checkpoint) is no change.
json with_absolute_paths(json j) {
  for (const auto& [sec, key] : {std::pair<const char*, const char*>{"model", "path"}, {"model", "config"},
                                 {"data", "train"}, {"data", "eval"}, {"output", "dir"}}) {
    if (!j.contains(sec) || !j[sec].is_object() || !j[sec].contains(key) || !j[sec][key].is_string()) continue;
    const std::string p = j[sec][key].get<std::string>();
    if (fs::path(p).is_relative()) j[sec][key] = resolved_path(p);
  }
  return j;
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

void save_adapter(const std::string& dir, const NamedTensors& trainable, const RunConfig& cfg,
                  bool tied_embeddings) {
  io::AdapterConfig a;
  a.r = cfg.lora.r;
  a.lora_alpha = cfg.lora.alpha;
  a.lora_dropout = cfg.lora.dropout;
  a.target_modules = cfg.lora.targets;
  // Absolute, as in run_config.json: peft loads the base from it, from any directory.
  a.base_model_name_or_path = resolved_path(cfg.model.path);
  NamedTensors out;
  for (const auto& [name, p] : trainable) {
    out.emplace_back(io::kPeftPrefix + name, p);
    if (!is_lora(name)) io::add_module_to_save(a, name);
    if (tied_embeddings && name == "model.embed_tokens.weight") {
      out.emplace_back(std::string(io::kPeftPrefix) + "lm_head.weight", p);
      io::add_module_to_save(a, "lm_head.weight");
    }
  }
  json j = io::adapter_config_to_json(a);
  write_text((fs::path(dir) / "adapter_config.json").string(), j.dump(2));
  io::save_tensors((fs::path(dir) / "adapter_model.safetensors").string(), out);
}

namespace {

// AdamW's moments and step count per trainable parameter, by name, and the RNG states,
// as safetensors. A resume reads them through the validating reader: LibTorch's
// archive (state.pt until format 2) trusted its file, and a crafted one crashed the
// process; it also matched moments to parameters by position.
io::FileDigest save_optimizer_state(const std::string& path, const NamedTensors& trainable,
                                    torch::optim::Optimizer& opt) {
  NamedTensors out;
  for (const auto& [name, p] : trainable) {
    auto it = opt.state().find(p.unsafeGetTensorImpl());
    if (it == opt.state().end()) continue;  // no update yet (every step so far skipped)
    const auto& ps = static_cast<const torch::optim::AdamWParamState&>(*it->second);
    out.emplace_back(name + ".exp_avg", ps.exp_avg());
    out.emplace_back(name + ".exp_avg_sq", ps.exp_avg_sq());
    out.emplace_back(name + ".step", torch::tensor({ps.step()}, torch::kInt64));
  }
  out.emplace_back("rng.cpu", at::detail::getDefaultCPUGenerator().get_state());
  if (torch::cuda::is_available())
    out.emplace_back("rng.cuda", at::globalContext().defaultGenerator(torch::Device(torch::kCUDA, 0)).get_state());
  return io::save_tensors(path, out, {{"format", "longlora-train optimizer state"}, {"optimizer", "adamw"}});
}

void write_checkpoint_files(const fs::path& tmp, const model::LlamaForCausalLMImpl& m, const NamedTensors& trainable,
                            torch::optim::Optimizer& opt, const TrainerState& st, const RunConfig& cfg,
                            const std::string& model_config) {
  std::map<std::string, io::FileDigest> written;  // the big files, digested as they were written
  if (cfg.lora.enabled) {
    save_adapter(tmp.string(), trainable, cfg, m.cfg.tie_word_embeddings);
  } else {
    NamedTensors all;
    for (const auto& item : m.named_parameters()) all.emplace_back(item.key(), item.value());
    written["model.safetensors"] = io::save_tensors((tmp / "model.safetensors").string(), all);
    if (model_config.empty()) throw Error("save_checkpoint: a full fine-tuning checkpoint needs its config.json");
    write_text((tmp / "config.json").string(), model_config);
    // A full fine-tune's checkpoint is a complete model directory: bring the tokenizer.
    const fs::path tok = fs::path(cfg.model.path) / "tokenizer.model";
    if (!cfg.model.path.empty() && fs::exists(tok)) fs::copy_file(tok, tmp / "tokenizer.model");
  }
  test_pause();
  written[kOptimizerFile] = save_optimizer_state((tmp / kOptimizerFile).string(), trainable, opt);
  test_pause();
  json ts = {{"format_version", kFormatVersion}, {"step", st.step},
             {"cursor", st.cursor},              {"bad_steps", st.bad_steps},
             {"tokens_seen", st.tokens_seen},    {"model", model_fingerprint(m.cfg)},
             {"loss_scale", st.loss_scale},      {"loss_scale_good_steps", st.loss_scale_good_steps},
             {"overflow_steps", st.overflow_steps},
             {"data", {{"rows", st.data_rows}, {"bytes", st.data_bytes}}},
             // The resolved linear RoPE factor the run trained with (export writes it down).
             {"rope_factor", m.cfg.rope_factor},
             // Every file written so far: weights, optimizer state, configs, tokenizer.
             {"files", io::digest_directory(tmp.string(), written)}};
  ts.update(model::base_sample_json(st.base_sample));
  if (!st.unlogged_metrics.empty()) ts["unlogged_metrics"] = st.unlogged_metrics;
  write_text((tmp / "trainer_state.json").string(), ts.dump(2));
  write_text((tmp / "run_config.json").string(), with_absolute_paths(to_json(cfg)).dump(2));
  write_text((tmp / "COMPLETE").string(), "ok\n");
  fsync_path(tmp.string());
}

}  // namespace

std::string full_finetune_config(const RunConfig& cfg, double rope_factor) {
  // The run's model config.json with the trained RoPE factor and fp32 (the master
  // weights a full fine-tune saves): fields we do not model (an eos_token_id list,
  // pad_token_id) stay.
  return io::model_dir_config(model_config_path(cfg), io::DType::F32, rope_factor);
}

std::string save_checkpoint(const std::string& output_dir, const model::LlamaForCausalLMImpl& m,
                            const NamedTensors& trainable, torch::optim::Optimizer& opt,
                            const TrainerState& st, const RunConfig& cfg, const std::string& model_config) {
  const std::string name = "checkpoint-" + std::to_string(st.step);
  const fs::path final_dir = fs::path(output_dir) / name;
  const fs::path tmp = fs::path(output_dir) / (".tmp-" + name);
  std::error_code ec;
  remove_tree(tmp.string());
  fs::create_directories(tmp, ec);
  if (ec) throw Error(tmp.string() + ": cannot create: " + ec.message());
  try {
    write_checkpoint_files(tmp, m, trainable, opt, st, cfg, model_config);
  } catch (...) {
    remove_tree(tmp.string());  // a failed save (disk full) must not keep the space it took
    throw;
  }
  remove_tree(final_dir.string());  // a re-save of the same step replaces it
  fs::rename(tmp, final_dir, ec);
  if (ec) throw Error(final_dir.string() + ": cannot rename checkpoint into place: " + ec.message());
  fsync_path(output_dir);
  return final_dir.string();
}

namespace {
// The directories checkpoint-N under output_dir with COMPLETE (`complete`) or
// without, by step.
std::vector<std::pair<int64_t, std::string>> checkpoint_dirs(const std::string& output_dir, bool complete) {
  static const std::regex re("checkpoint-([0-9]+)");
  std::vector<std::pair<int64_t, std::string>> out;
  if (!fs::is_directory(output_dir)) return out;
  for (const auto& e : fs::directory_iterator(output_dir)) {
    std::smatch m;
    const std::string n = e.path().filename().string();
    if (!(e.is_directory() && std::regex_match(n, m, re) && fs::exists(e.path() / "COMPLETE") == complete)) continue;
    // 20 digits overflow int64 (std::stoll threw "stoll", naming nothing); no run of
    // ours saves such a step, so the directory is not one of ours.
    if (m[1].length() > 18) {
      if (complete) spdlog::warn("{}: step number too large: not a checkpoint of this tool, ignored", e.path().string());
      continue;
    }
    out.emplace_back(std::stoll(m[1]), e.path().string());
  }
  std::sort(out.begin(), out.end());
  return out;
}
}  // namespace

bool is_checkpoint_name(const std::string& name) {
  static const std::regex re("checkpoint-[0-9]+");
  return std::regex_match(name, re);
}

std::vector<std::pair<int64_t, std::string>> complete_checkpoints(const std::string& output_dir) {
  return checkpoint_dirs(output_dir, true);
}

std::vector<std::pair<int64_t, std::string>> incomplete_checkpoints(const std::string& output_dir) {
  return checkpoint_dirs(output_dir, false);
}

std::optional<std::string> latest_checkpoint(const std::string& output_dir) {
  auto all = complete_checkpoints(output_dir);
  if (all.empty()) return std::nullopt;
  return all.back().second;
}

void prune_checkpoints(const std::string& output_dir, int64_t keep) {
  for (const auto& e : fs::directory_iterator(output_dir))
    if (e.path().filename().string().rfind(".tmp-checkpoint-", 0) == 0) remove_tree(e.path().string());
  auto done = complete_checkpoints(output_dir);
  for (size_t i = 0; i + keep < done.size(); ++i) remove_tree(done[i].second);
}

namespace {

// A complete checkpoint's trainer_state.json, its fields checked into `st`; the
// document itself for what else the caller reads of it.
json read_state_file(const std::string& dir, TrainerState& st) {
  const std::string file = (fs::path(dir) / "trainer_state.json").string();
  if (!fs::is_directory(dir)) throw Error(dir + ": no such checkpoint directory");
  if (!fs::exists(fs::path(dir) / "COMPLETE")) throw Error(dir + ": not a complete checkpoint (no COMPLETE marker)");
  const json ts = read_json_file(file);
  const JsonFields f(ts, file);
  if (const auto v = f.integer("format_version"); v != kFormatVersion && v != kLegacyStateVersion)
    f.fail("format_version", json_brief(ts.value("format_version", json(nullptr))) + " is not " +
                                 std::to_string(kFormatVersion) + " (or " + std::to_string(kLegacyStateVersion) +
                                 ", before the optimizer state was safetensors)");
  auto count = [&](const char* key, bool required) -> int64_t {
    const auto v = f.integer(key);
    if (!v) {
      if (required) f.fail(key, "missing");
      return 0;
    }
    // The bound leaves room to count on: a cursor of 2^63 - 1 overflowed at the next
    // row and indexed the data out of bounds.
    if (*v < 0 || *v > (int64_t{1} << 62)) f.expected(key, "an integer in [0, 2^62]");
    return *v;
  };
  st.step = count("step", true);
  // A resume picks checkpoint-N by its name: a step that disagrees would skip or
  // repeat steps (and shift the schedule) without a word. Other names (a copy the
  // user renamed, given to --resume-from) are taken at their word.
  fs::path normal = fs::path(dir).lexically_normal();
  if (normal.filename().empty()) normal = normal.parent_path();  // "checkpoint-3/"
  const std::string name = normal.filename().string();
  if (is_checkpoint_name(name) && name != "checkpoint-" + std::to_string(st.step))
    f.fail("step", std::to_string(st.step) + ", but the directory is " + name);
  st.cursor = count("cursor", true);
  st.bad_steps = count("bad_steps", false);
  st.tokens_seen = count("tokens_seen", false);
  st.loss_scale_good_steps = count("loss_scale_good_steps", false);
  st.overflow_steps = count("overflow_steps", false);
  if (st.overflow_steps > st.step) f.fail("overflow_steps", "more than step");
  // Absent before fp16 loss scaling: 0, and a dynamic scale starts afresh.
  if (const auto s = f.number("loss_scale")) {
    if (*s < 0) f.expected("loss_scale", "a number >= 0");
    st.loss_scale = *s;
  }
  if (const auto d = f.object("data")) {  // absent in checkpoints before it was recorded
    auto n = [&](const char* key) {
      const auto v = d->integer(key);
      if (v && *v < 0) d->expected(key, "an integer >= 0");
      return v.value_or(0);
    };
    st.data_rows = n("rows");
    st.data_bytes = n("bytes");
  }
  if (!ts.contains("model") || !ts["model"].is_object()) fail(file, "model", "missing");
  st.base_sample = model::parse_base_sample(ts, file);
  if (ts.contains("unlogged_metrics")) {
    const json& u = ts["unlogged_metrics"];
    if (!u.is_array()) f.expected("unlogged_metrics", "a list of metrics records");
    for (const auto& r : u) {
      // Appended to metrics.jsonl on resume, where every record has a step at or before this one.
      if (!r.is_object() || !r.contains("step") || !r["step"].is_number_integer() || r["step"].get<int64_t>() < 0 ||
          r["step"].get<int64_t>() > st.step)
        f.expected("unlogged_metrics", "a list of records (objects) with a step from 0 to step");
      st.unlogged_metrics.push_back(r);
    }
  }
  return ts;
}

}  // namespace

TrainerState read_trainer_state(const std::string& dir) {
  TrainerState st;
  read_state_file(dir, st);
  return st;
}

namespace {

// The keys whose values are sets: the order they are written in changes nothing
// ("norm,embed" trains what "embed, norm" does), so a resume compares them as sets.
json as_compared(const std::string& key, const json& v) {
  if (key == "lora.targets" && v.is_array()) {
    std::set<std::string> names;
    for (const auto& t : v)
      if (t.is_string()) names.insert(t.get<std::string>());
    return json(names);
  }
  if (key == "trainable_params" && v.is_string()) {
    const auto e = trainable_entries(v.get<std::string>());
    return json(std::set<std::string>(e.begin(), e.end()));
  }
  return v;
}

// "a.b.c" leaves of a run config whose values differ (arrays compared whole).
void config_diffs(const json& was, const json& now, const std::string& prefix,
                  std::vector<std::tuple<std::string, json, json>>& out) {
  for (auto it = now.begin(); it != now.end(); ++it) {
    const std::string key = prefix.empty() ? it.key() : prefix + "." + it.key();
    const json old = was.is_object() && was.contains(it.key()) ? was[it.key()] : json(nullptr);
    if (it.value().is_object()) config_diffs(old, it.value(), key, out);
    else if (as_compared(key, old) != as_compared(key, it.value())) out.emplace_back(key, old, it.value());
  }
}

}  // namespace

// One parameter's entries in an optimizer-state file: KEY.exp_avg, KEY.exp_avg_sq and
// KEY.step, KEY its name (format 2) or its position in the optimizer (format 1).
struct StateSlot {
  std::string key, name;
  torch::Tensor param;
};

// Checks every entry of `file` (named `path` in errors) and only then sets the
// optimizer's state and the RNGs: a name this run trains, every parameter's state or
// none, the parameter's shape, finite float moments (the second >= 0), one step count
// for all in [0, step], RNG states LibTorch takes.
void apply_optimizer_state(const std::shared_ptr<io::SafetensorsFile>& file, const std::string& path,
                           const std::vector<StateSlot>& slots, torch::optim::Optimizer& opt, int64_t step) {
  auto entry = [&](const std::string& name) -> const io::TensorInfo* {
    return file->contains(name) ? &file->get(name) : nullptr;
  };
  auto tensor = [&](const StateSlot& s, const char* part) {
    return "tensor '" + s.key + part + "'" + (s.key == s.name ? "" : " (of " + s.name + ")");
  };
  const char* kParts[] = {".exp_avg", ".exp_avg_sq", ".step"};
  std::set<std::string> known{"rng.cpu", "rng.cuda"};
  for (const auto& s : slots)
    for (const char* part : kParts) known.insert(s.key + part);
  for (const auto& t : file->tensors())
    if (!known.count(t.name))
      throw Error(path + ": tensor '" + t.name + "' is the state of no parameter this run trains");
  std::vector<std::pair<void*, std::unique_ptr<torch::optim::AdamWParamState>>> restored;
  const StateSlot* without = nullptr;  // a parameter without state, if any
  std::optional<int64_t> counted;      // the step count of those with state
  for (const auto& s : slots) {
    const io::TensorInfo* m = entry(s.key + ".exp_avg");
    const io::TensorInfo* v = entry(s.key + ".exp_avg_sq");
    const io::TensorInfo* n = entry(s.key + ".step");
    if (!m && !v && !n) {
      without = without ? without : &s;
      continue;
    }
    if (!m || !v || !n)
      throw Error(path + ": " + tensor(s, !m ? ".exp_avg" : !v ? ".exp_avg_sq" : ".step") +
                  " missing beside the others of its parameter");
    for (const auto& [t, part] : {std::pair{m, ".exp_avg"}, std::pair{v, ".exp_avg_sq"}}) {
      if (!io::is_float(t->dtype))
        throw Error(path + ": " + tensor(s, part) + " is " + io::dtype_name(t->dtype) + ", not floating point");
      if (t->shape != s.param.sizes().vec())
        throw Error(path + ": " + tensor(s, part) + " has shape " + c10::str(c10::IntArrayRef(t->shape)) +
                    ", the parameter " + c10::str(s.param.sizes()) + ": the state of another run?");
      if (!io::all_finite(t->data, static_cast<size_t>(t->numel()), t->dtype))
        throw Error(path + ": " + tensor(s, part) + " is not finite");
    }
    if (n->dtype != io::DType::I64 || n->numel() != 1)
      throw Error(path + ": " + tensor(s, ".step") + " is not one I64 step count");
    int64_t count = 0;
    std::memcpy(&count, n->data, sizeof count);
    // Each update counts one step; skipped steps count none. A negative count gave NaN
    // bias corrections. Every update steps every parameter.
    if (count < 0 || count > step)
      throw Error(path + ": " + tensor(s, ".step") + ": step count " + std::to_string(count) + " outside [0, " +
                  std::to_string(step) + "], the checkpoint's step");
    if (counted && *counted != count)
      throw Error(path + ": " + tensor(s, ".step") + ": step count " + std::to_string(count) + ", another parameter's " +
                  std::to_string(*counted) + " (every update counts for all)");
    counted = count;
    // Copies onto the parameter's device and dtype: the views read the mapping.
    auto ps = std::make_unique<torch::optim::AdamWParamState>();
    ps->step(count);
    ps->exp_avg(io::view_tensor(*m, file).to(s.param.options(), false, true));
    ps->exp_avg_sq(io::view_tensor(*v, file).to(s.param.options(), false, true));
    if (!(ps->exp_avg_sq() >= 0).all().item<bool>())  // NaN updates otherwise
      throw Error(path + ": " + tensor(s, ".exp_avg_sq") + " has negative entries (a second moment is >= 0)");
    restored.emplace_back(s.param.unsafeGetTensorImpl(), std::move(ps));
  }
  // Every update steps every trainable parameter (each has a gradient): a state that
  // lacks some restarted their moments from zero, and the run went on, silently other.
  if (without && !restored.empty())
    throw Error(path + ": " + tensor(*without, ".exp_avg") + " missing: the state of some parameters, not of all");
  auto rng = [&](const char* name) -> std::optional<torch::Tensor> {
    const io::TensorInfo* t = entry(name);
    if (!t) return std::nullopt;
    if (t->dtype != io::DType::U8 || t->shape.size() != 1)
      throw Error(path + ": tensor '" + std::string(name) + "' is not a list of bytes (U8)");
    return io::view_tensor(*t, file).clone();
  };
  const auto cpu_state = rng("rng.cpu");
  if (!cpu_state) throw Error(path + ": tensor 'rng.cpu' missing");
  const auto cuda_state = rng("rng.cuda");
  // set_state checks a state's size and each field alone: a crafted state with
  // next + left > 625 passed, and dropout read past the 624 words of the mt19937
  // state. With draws, next + left is 625 (1 and 0 before the first); next and left
  // lie at bytes 16 and 8 of LibTorch's 5056-byte CPU state (CPUGeneratorImplState).
  if (cpu_state->numel() == 5056) {
    int32_t left = 0;
    uint32_t next = 0;
    std::memcpy(&left, cpu_state->data_ptr<uint8_t>() + 8, 4);
    std::memcpy(&next, cpu_state->data_ptr<uint8_t>() + 16, 4);
    if (left < 1 || left > 624 || next > static_cast<uint32_t>(625 - left))
      throw Error(path + ": tensor 'rng.cpu' is no CPU generator state: mt19937 position " + std::to_string(next) +
                  " with " + std::to_string(left) + " left runs past its 624 words");
  }
  try {
    at::Generator g = at::detail::getDefaultCPUGenerator();
    g.set_state(*cpu_state);
  } catch (const c10::Error& e) {
    throw Error(path + ": tensor 'rng.cpu' is no CPU generator state: " + first_line(e));
  }
  if (torch::cuda::is_available()) {
    if (!cuda_state) {
      spdlog::warn("{}: no CUDA generator state (saved where there was no GPU): dropout draws other masks than "
                   "an uninterrupted run would", path);
    } else {
      try {
        at::Generator g = at::globalContext().defaultGenerator(torch::Device(torch::kCUDA, 0));
        g.set_state(*cuda_state);
      } catch (const c10::Error& e) {
        throw Error(path + ": tensor 'rng.cuda' is no CUDA generator state: " + first_line(e));
      }
    }
  }
  opt.state().clear();
  for (auto& [key, ps] : restored) opt.state()[key] = std::move(ps);
}

// Format 2: optimizer.safetensors, by parameter name.
void load_optimizer_state(const std::string& path, const NamedTensors& trainable, torch::optim::Optimizer& opt,
                          int64_t step) {
  if (!fs::exists(path)) throw Error(path + ": missing: the checkpoint has no optimizer state");
  std::vector<StateSlot> slots;
  for (const auto& [name, p] : trainable) slots.push_back({name, name, p});
  apply_optimizer_state(std::make_shared<io::SafetensorsFile>(path), path, slots, opt, step);
}

// Format 1: state.pt, by position in the optimizer's groups, read in a child process
// (legacy_state.h) and then checked as format 2's.
void load_legacy_state(const std::string& path, const NamedTensors& trainable, torch::optim::Optimizer& opt,
                       int64_t step, const std::string& scratch_dir) {
  std::map<void*, std::string> names;
  for (const auto& [name, p] : trainable) names[p.unsafeGetTensorImpl()] = name;
  std::vector<StateSlot> slots;
  std::vector<size_t> group_sizes;
  for (const auto& g : opt.param_groups()) {
    group_sizes.push_back(g.params().size());
    for (const auto& p : g.params()) {
      auto it = names.find(p.unsafeGetTensorImpl());
      slots.push_back({std::to_string(slots.size()), it == names.end() ? "?" : it->second, p});
    }
  }
  apply_optimizer_state(read_legacy_state(path, group_sizes, scratch_dir), path, slots, opt, step);
}

TrainerState load_checkpoint(const std::string& dir, const NamedTensors& trainable,
                             torch::optim::Optimizer& opt, const RunConfig& cfg,
                             const io::ModelConfig& model_cfg) {
  const fs::path d(dir);
  TrainerState st;
  const json ts = read_state_file(dir, st);
  io::verify_checkpoint_files(dir, ts, (d / "trainer_state.json").string(), true);
  // What must agree for the saved tensors and optimizer state to mean the same thing.
  std::vector<std::string> diffs;
  const json want_model = model_fingerprint(model_cfg);
  for (auto it = want_model.begin(); it != want_model.end(); ++it)
    if (ts["model"].value(it.key(), json(nullptr)) != it.value())
      diffs.push_back("model " + it.key() + " is " + json_brief(ts["model"].value(it.key(), json(nullptr))) +
                      " there, " + json_brief(it.value()) + " here");
  const std::string saved_path = (d / "run_config.json").string();
  const json saved = with_absolute_paths(read_json_file(saved_path));
  const json now = with_absolute_paths(to_json(cfg));
  // trainable_params is compared by what it selects, below: "embed_tokens,norm" trains
  // what "embed,norm" does.
  const std::vector<std::string> fatal{"lora.enabled", "lora.r", "lora.alpha", "lora.targets"};
  std::vector<std::tuple<std::string, json, json>> changed;
  config_diffs(saved, now, "", changed);
  for (const auto& [key, was, is] : changed)
    if (std::find(fatal.begin(), fatal.end(), key) != fatal.end())
      diffs.push_back(key + " is " + (was.is_null() ? "missing" : json_brief(was, 200)) + " there, " + json_brief(is, 200) + " here");
  if (!diffs.empty()) {
    std::string msg;
    for (const auto& s : diffs) msg += (msg.empty() ? "" : "; ") + s;
    throw Error(dir + ": checkpoint does not fit the config: " + msg);
  }
  // Any other change is the user's to make (a new learning rate, more steps), but not
  // silently: the data cursor, for one, counts rows of the old data and batch shape.
  for (const auto& [key, was, is] : changed)
    if (std::find(fatal.begin(), fatal.end(), key) == fatal.end())
      spdlog::warn("resume: {} is {} now, {} in {}", key, json_brief(is, 200), was.is_null() ? "missing" : json_brief(was, 200),
                   saved_path);

  // Changing seq_len moves the automatic RoPE factor: the adapter trained at one
  // position scale would continue at another.
  // trained_rope_factor refuses a recorded factor that is not a number >= 1, as eval
  // and export do.
  if (const auto was = model::trained_rope_factor(dir); was && *was != model_cfg.rope_factor)
    spdlog::warn("resume: linear RoPE factor {} now, {} in {}", model_cfg.rope_factor, *was,
                 (d / "trainer_state.json").string());

  auto tensors = io::load_tensors(
      (d / (cfg.lora.enabled ? "adapter_model.safetensors" : "model.safetensors")).string());
  torch::NoGradGuard ng;
  const std::string trainable_sets = "(trainable_params " + json_brief(saved.value("trainable_params", json(nullptr))) +
                                     " there, \"" + cfg.trainable_params + "\" here)";
  // The checkpoint holds what its run trained: a tensor this run does not train would
  // be dropped, its training lost (trainable_params selecting less than it did).
  {
    std::set<std::string> keys;
    for (const auto& [name, p] : trainable) keys.insert(cfg.lora.enabled ? io::kPeftPrefix + name : name);
    // save_adapter's second name for a tied embedding.
    if (cfg.lora.enabled && keys.count(io::kPeftPrefix + std::string("model.embed_tokens.weight")) &&
        model_cfg.tie_word_embeddings)
      keys.insert(io::kPeftPrefix + std::string("lm_head.weight"));
    for (const auto& [key, t] : tensors)
      if (!keys.count(key))
        throw Error(dir + ": tensor '" + key + "' was trained by the checkpoint's run, not by this one " + trainable_sets);
  }
  for (const auto& [name, p] : trainable) {
    const std::string key = cfg.lora.enabled ? io::kPeftPrefix + name : name;
    auto it = tensors.find(key);
    if (it == tensors.end())
      throw Error(dir + ": tensor '" + key + "' missing from the checkpoint " + trainable_sets);
    if (it->second.sizes() != p.sizes())
      throw Error(dir + ": tensor '" + key + "' has another shape than the model's");
    // copy_ converts anything: integers went in as huge weights. Only a finite float
    // is a state to continue from (a NaN would make every step a skipped one).
    if (!it->second.is_floating_point() || !torch::isfinite(it->second).all().item<bool>())
      throw Error(dir + ": tensor '" + key + "' is " +
                  (it->second.is_floating_point() ? "not finite" : "not floating point (" + dtype_string(it->second.scalar_type()) + ")"));
    p.copy_(it->second);
  }
  if (ts.value("format_version", kFormatVersion) == kLegacyStateVersion)
    load_legacy_state((d / "state.pt").string(), trainable, opt, st.step, cfg.output.dir);
  else
    load_optimizer_state((d / kOptimizerFile).string(), trainable, opt, st.step);
  return st;
}

}  // namespace longlora::train
