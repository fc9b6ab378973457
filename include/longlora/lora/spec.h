// What LoRA to add (no torch here: the run config embeds it).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace longlora::lora {

struct LoraSpec {
  bool enabled = true;  // false: full fine-tuning (every parameter trains)
  int64_t r = 8;
  double alpha = 16;
  double dropout = 0.0;
  std::vector<std::string> targets{"q_proj", "k_proj", "v_proj", "o_proj"};
  double scale() const { return alpha / static_cast<double>(r); }
};

}  // namespace longlora::lora
