#include "longlora/io/adapter.h"

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "longlora/common/error.h"
#include "longlora/common/json_file.h"

using nlohmann::json;

namespace longlora::io {

double AdapterConfig::scale() const {
  return use_rslora ? lora_alpha / std::sqrt(static_cast<double>(r)) : lora_alpha / static_cast<double>(r);
}

namespace {
std::vector<std::string> string_list(const json& j, const std::string& key, const std::string& src) {
  std::vector<std::string> out;
  if (!j.contains(key) || j[key].is_null()) return out;
  if (j[key].is_string())
    fail(src, key, "a regular expression is not supported; list the module names");
  if (!j[key].is_array()) fail(src, key, "expected a list of module names");
  for (const auto& s : j[key]) {
    if (!s.is_string()) fail(src, key, "expected a list of module names");
    out.push_back(s.get<std::string>());
  }
  return out;
}
}  // namespace

AdapterConfig load_adapter_config(const std::string& path) {
  json j = read_json_file(path);
  if (!j.is_object()) fail(path, "", "expected a JSON object");
  if (j.value("peft_type", std::string("LORA")) != "LORA")
    fail(path, "peft_type", "only LORA adapters are supported");
  auto flag = [&](const char* k) { return j.contains(k) && j[k].is_boolean() && j[k].get<bool>(); };
  if (flag("use_dora")) fail(path, "use_dora", "DoRA is not supported");
  if (flag("fan_in_fan_out")) fail(path, "fan_in_fan_out", "true is not supported");
  if (j.contains("bias") && j["bias"] != "none") fail(path, "bias", "only \"none\" is supported");
  if (j.contains("layers_to_transform") && !j["layers_to_transform"].is_null())
    fail(path, "layers_to_transform", "not supported");
  for (const char* k : {"rank_pattern", "alpha_pattern"})
    if (j.contains(k) && j[k].is_object() && !j[k].empty()) fail(path, k, "not supported");
  AdapterConfig c;
  if (!j.contains("r") || !j["r"].is_number_integer() || j["r"].get<int64_t>() < 1)
    fail(path, "r", "expected a positive integer");
  c.r = j["r"].get<int64_t>();
  if (!j.contains("lora_alpha") || !j["lora_alpha"].is_number())
    fail(path, "lora_alpha", "expected a number");
  c.lora_alpha = j["lora_alpha"].get<double>();
  if (j.contains("lora_dropout") && j["lora_dropout"].is_number())
    c.lora_dropout = j["lora_dropout"].get<double>();
  c.use_rslora = flag("use_rslora");
  c.target_modules = string_list(j, "target_modules", path);
  c.modules_to_save = string_list(j, "modules_to_save", path);
  if (j.contains("base_model_name_or_path") && j["base_model_name_or_path"].is_string())
    c.base_model_name_or_path = j["base_model_name_or_path"].get<std::string>();
  return c;
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
