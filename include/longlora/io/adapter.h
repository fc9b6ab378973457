// peft adapters: adapter_config.json + adapter_model.safetensors.
// Keys: base_model.model.<param name>, LoRA as <module>.lora_A.weight / lora_B.weight,
// modules_to_save as full tensors under their own names.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace longlora::io {

struct AdapterConfig {
  int64_t r = 8;
  double lora_alpha = 16;
  double lora_dropout = 0.0;
  bool use_rslora = false;
  std::vector<std::string> target_modules;
  std::vector<std::string> modules_to_save;
  std::string base_model_name_or_path;
  double scale() const;
};

inline const char* kPeftPrefix = "base_model.model.";

AdapterConfig load_adapter_config(const std::string& path);  // adapter_config.json
nlohmann::json adapter_config_to_json(const AdapterConfig& c);

}  // namespace longlora::io
