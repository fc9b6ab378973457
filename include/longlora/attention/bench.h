// Attention micro-benchmark: the S2 CUDA kernel against the sdpa baseline.
#pragma once

#include <cstdint>
#include <string>

namespace longlora::attention {

struct AttentionBenchOptions {
  int64_t seq_len = 32768, heads = 32, kv_heads = 32, head_dim = 128, batch = 1;
  std::string dtype = "bf16", mode = "segments";  // dtype: bf16 | fp16; mode: full | segments | roll
  double group_ratio = 0.25;                        // G = group_ratio * seq_len (full: G = L)
  int warmup = 3, iters = 10;
  bool json = false;  // one JSON object per line instead of a table
};

// Times forward and forward+backward (CUDA events) of backends kernel and sdpa in one
// run; prints ms and effective TFLOP/s over the unmasked work, and the device name.
// Returns 0, or 1 (with a one-line message) on a build without CUDA or with no device.
int run_attention_bench(const AttentionBenchOptions& opt);

}  // namespace longlora::attention
