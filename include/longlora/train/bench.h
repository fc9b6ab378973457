// Training benchmark: a model of a given shape with random weights, the default
// LongLoRA recipe, batch 1, full training steps (forward, backward, AdamW).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace longlora::train {

struct TrainBenchOptions {
  std::string shape;              // a config.json (configs/shapes/llama2-7b.json)
  int64_t seq_len = 32768;
  int steps = 5, warmup = 2;
  bool json = false;
  int profile = 0;  // > 0: one more step under the profiler, its top rows printed
  std::string device = "auto";
  std::vector<std::string> overrides;  // --set key=value on the run config
};

// Prints tokens/s, step time, MFU, peak memory, a time breakdown and the device.
int run_train_bench(const TrainBenchOptions& o);

}  // namespace longlora::train
