#include "longlora/io/adapter.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "longlora/common/error.h"
#include "longlora/common/json_file.h"
#include "longlora/io/hf_config.h"

using nlohmann::json;

namespace longlora::io {

double AdapterConfig::scale() const {
  return use_rslora ? lora_alpha / std::sqrt(static_cast<double>(r)) : lora_alpha / static_cast<double>(r);
}

namespace {

// A list of module names; peft also takes one string, a regular expression (or
// "all-linear"), which we do not implement.
std::vector<std::string> module_list(const JsonFields& f, const std::string& key) {
  if (f.given(key) && f.at(key).is_string())
    f.fail(key, "a regular expression is not supported; list the module names");
  return f.strings(key).value_or(std::vector<std::string>{});
}


// adapter_config.json keys load_adapter_config reads (and checks) itself.
const std::set<std::string> kReadKeys = {
    "peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules", "modules_to_save",
    "base_model_name_or_path", "init_lora_weights", "use_dora", "fan_in_fan_out", "lora_bias", "bias",
    "layers_to_transform", "layer_replication", "alora_invocation_tokens", "trainable_token_indices",
    "rank_pattern", "alpha_pattern", "exclude_modules", "target_parameters"};

// Keys whose value, whatever it is, cannot change the model peft loads from this file.
const std::set<std::string> kHarmlessKeys = {
    // PeftConfig bookkeeping: the wrapper class, trainability, where the base came from.
    "task_type", "inference_mode", "auto_mapping", "revision", "peft_version",
    // peft reads it only together with layers_to_transform, which must be null.
    "layers_pattern",
    // Imported only when megatron_config is set, which must be null.
    "megatron_core",
    // Read only by the QALoRA variant (use_qalora, which must be false).
    "qalora_group_size",
    // Only for init_lora_weights "loftq" / "corda" (refused above) or "eva", whose
    // data-driven first factors the saved ones replace (a changed rank is in rank_pattern).
    "loftq_config", "corda_config", "eva_config",
    // Never saved by peft; only moves DoRA's init to the GPU.
    "runtime_config"};

// Options we do not implement, each allowed only at its default (null always is).
const std::map<std::string, json> kOffByDefault = {
    {"use_qalora", false},         {"ensure_weight_tying", false}, {"megatron_config", nullptr},
    {"use_bdlora", nullptr},       {"arrow_config", nullptr},      {"lora_ga_config", nullptr},
    {"kasa_config", nullptr},      {"monteclora_config", nullptr}, {"velora_config", nullptr}};

}  // namespace

AdapterConfig load_adapter_config(const std::string& path) {
  const json j = read_json_file(path);
  const JsonFields f(j, path);
  if (f.string("peft_type").value_or("LORA") != "LORA")
    f.fail("peft_type", "only LORA adapters are supported");

  // Options that make peft build or load the adapter differently from plain LoRA on
  // whole Linear modules. We implement none of them, so a non-default value is
  // refused: ignoring it would load another model than peft does.
  if (f.boolean("use_dora").value_or(false)) f.fail("use_dora", "DoRA is not supported");
  if (f.boolean("fan_in_fan_out").value_or(false)) f.fail("fan_in_fan_out", "true is not supported");
  if (f.boolean("lora_bias").value_or(false)) f.fail("lora_bias", "true is not supported");
  if (f.string("bias").value_or("none") != "none") f.fail("bias", "only \"none\" is supported");
  // (layers_pattern is not here: peft reads it only together with layers_to_transform.)
  for (const char* k : {"layers_to_transform", "layer_replication", "alora_invocation_tokens",
                        "trainable_token_indices"})
    if (f.given(k)) f.fail(k, "not supported (expected null), got " + json_brief(f.at(k)));
  for (const char* k : {"rank_pattern", "alpha_pattern"})
    if (auto p = f.object(k); p && !f.at(k).empty()) f.fail(k, "not supported (expected {})");
  for (const char* k : {"exclude_modules", "target_parameters"})
    if (f.given(k) && !(f.at(k).is_array() && f.at(k).empty()))
      f.fail(k, "not supported (expected null or []), got " + json_brief(f.at(k)));
  // Most inits only set the factors' first values, which the saved ones replace. PiSSA,
  // OLoRA, CorDA and LoftQ also subtract their first B·A from the base weights (peft
  // redoes that at load); the saved factors then belong on that residual base, not on W.
  if (f.given("init_lora_weights")) {
    const json& v = f.at("init_lora_weights");
    if (v.is_string()) {
      const std::string s = v.get<std::string>();
      if (s.rfind("pissa", 0) == 0 || s.rfind("corda", 0) == 0 || s == "olora" || s == "loftq")
        f.fail("init_lora_weights", "\"" + s +
                                        "\" factors apply to a base with their initial B·A removed, which is not "
                                        "supported; convert the adapter to plain LoRA with peft first "
                                        "(save_pretrained(..., path_initial_model_for_weight_conversion=...))");
      if (s != "gaussian" && s != "eva" && s != "orthogonal")
        f.fail("init_lora_weights", "unknown value \"" + s + "\"");
    } else if (!v.is_boolean()) {
      f.expected("init_lora_weights", "true, false or a string");
    }
  }
  // Newer peft versions add options; one we do not know may build another model, so
  // any other key passes only at a value that leaves it off.
  for (const auto& [k, v] : j.items()) {
    if (kReadKeys.count(k) || kHarmlessKeys.count(k) || v.is_null()) continue;
    if (const auto d = kOffByDefault.find(k); d != kOffByDefault.end()) {
      if (v != d->second) f.fail(k, "not supported (expected " + json_brief(d->second) + "), got " + json_brief(v));
    } else if (!(v.is_boolean() && !v.get<bool>()) && !((v.is_object() || v.is_array()) && v.empty())) {
      f.fail(k, "not supported (an option this loader does not know; only null, false, {} or [] are taken), got " +
                    json_brief(v));
    }
  }

  AdapterConfig c;
  const auto r = f.integer("r");
  if (!r || *r < 1) f.fail("r", "expected a positive integer");
  c.r = *r;
  // The scale alpha/r (alpha/sqrt(r) with rslora) multiplies fp32 activations.
  const auto alpha = f.number("lora_alpha");
  if (!alpha || !(*alpha > 0) || *alpha > std::numeric_limits<float>::max())
    f.fail("lora_alpha", "expected a number > 0 that fits in float32, got " +
                             (f.given("lora_alpha") ? json_brief(f.at("lora_alpha")) : std::string("nothing")));
  c.lora_alpha = *alpha;
  c.lora_dropout = f.number("lora_dropout").value_or(0.0);
  if (!(c.lora_dropout >= 0 && c.lora_dropout < 1))
    f.fail("lora_dropout", "expected a number in [0, 1), got " + json_brief(f.at("lora_dropout")));
  c.use_rslora = f.boolean("use_rslora").value_or(false);
  // peft keeps target_modules as a set: a name listed twice is one target.
  for (auto& t : module_list(f, "target_modules"))
    if (std::find(c.target_modules.begin(), c.target_modules.end(), t) == c.target_modules.end())
      c.target_modules.push_back(std::move(t));
  c.modules_to_save = module_list(f, "modules_to_save");
  c.base_model_name_or_path = f.string("base_model_name_or_path").value_or("");
  return c;
}

void add_module_to_save(AdapterConfig& c, const std::string& param) {
  std::string mod = param.substr(0, param.rfind('.'));
  mod = mod.substr(mod.rfind('.') + 1);
  if (std::find(c.modules_to_save.begin(), c.modules_to_save.end(), mod) == c.modules_to_save.end())
    c.modules_to_save.push_back(mod);
}

bool is_embedding_layer(const std::string& param) {
  return param == "model.embed_tokens.weight" || param == "lm_head.weight";
}

bool saves_equal_embeddings(const SafetensorsFile& adapter) {
  const std::string prefix = kPeftPrefix, e = prefix + "model.embed_tokens.weight", h = prefix + "lm_head.weight";
  if (!adapter.contains(e) || !adapter.contains(h)) return false;
  const TensorInfo &a = adapter.get(e), &b = adapter.get(h);
  return a.dtype == b.dtype && a.shape == b.shape && std::memcmp(a.data, b.data, a.nbytes) == 0;
}

std::string tied_embedding_key(const SafetensorsFile& adapter) {
  const std::string prefix = kPeftPrefix, e = prefix + "model.embed_tokens.weight", h = prefix + "lm_head.weight";
  if (adapter.contains(e) && adapter.contains(h) && !saves_equal_embeddings(adapter))
    fail(adapter.path(), "tensor '" + h + "'",
         "differs from '" + e + "', but the base model ties the two (tie_word_embeddings): one matrix cannot be both");
  return adapter.contains(h) ? h : adapter.contains(e) ? e : "";
}

std::string vocabulary_mismatch(const std::string& param, const std::vector<int64_t>& got,
                                const std::vector<int64_t>& want) {
  if (!is_embedding_layer(param) || got.size() != 2 || want.size() != 2 || got[1] != want[1] || got[0] == want[0])
    return "";
  return "shape [" + std::to_string(got[0]) + ", " + std::to_string(got[1]) + "] but the base model's is [" +
         std::to_string(want[0]) + ", " + std::to_string(want[1]) + "]: the adapter's vocabulary differs from the " +
         "base's (it was saved after resizing the embeddings, which is not supported)";
}

json adapter_config_to_json(const AdapterConfig& c) {
  json j = {
      {"peft_type", "LORA"},
      {"task_type", "CAUSAL_LM"},
      {"r", c.r},
      {"lora_alpha", c.lora_alpha},
      {"lora_dropout", c.lora_dropout},
      {"target_modules", c.target_modules},
      {"modules_to_save", c.modules_to_save.empty() ? json(nullptr) : json(c.modules_to_save)},
      {"bias", "none"},
      {"fan_in_fan_out", false},
      {"inference_mode", true},
      {"init_lora_weights", true},
      {"use_rslora", c.use_rslora},
      {"use_dora", false},
      {"layers_to_transform", nullptr},
      {"layers_pattern", nullptr},
      {"rank_pattern", json::object()},
      {"alpha_pattern", json::object()},
      {"revision", nullptr},
      {"base_model_name_or_path",
       c.base_model_name_or_path.empty() ? json(nullptr) : json(c.base_model_name_or_path)},
  };
  return j;
}

}  // namespace longlora::io
