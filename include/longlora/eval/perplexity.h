// Perplexity over a token stream with full attention: windows start at 0, S, 2S, ...
// while start + L + 1 <= n; each feeds tokens[start, start+L) and predicts
// tokens[start+1, start+L+1); loss = mean NLL over every prediction of every window.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "longlora/model/llama.h"

namespace longlora::eval {

struct PerplexityResult {
  double loss = 0, perplexity = 0;
  int64_t tokens = 0, windows = 0, seq_len = 0;
};

// "SOURCE: N tokens are too few for one window of seq_len L (+1 target)" when the
// stream has no window of L; perplexity() checks it too.
void check_windows(int64_t n_tokens, int64_t seq_len, const std::string& source);

// `source` names the data in the error for a stream too short for one window.
PerplexityResult perplexity(model::LlamaForCausalLMImpl& m, const std::vector<int32_t>& tokens,
                            int64_t seq_len, int64_t stride, const std::string& source,
                            int64_t loss_chunk = 2048);

// The same under LongLoRA's protocol (below): an Error unless a window is left.
void check_longlora_windows(int64_t n_tokens, int64_t seq_len, int64_t stride, const std::string& source);

// LongLoRA's eval.py, so that figures compare with its tables: window starts
// range(0, n - L, stride) without the last one; each window tokens[s, s+L) scores its
// own L - 1 next tokens (labels = input_ids); the windows' mean losses are averaged in
// batches of `batch_size` (its --batch_size, 32), the batches' means averaged, and the
// perplexity is 2.71828 ** loss, as it writes it. An Error when no window is left.
PerplexityResult perplexity_longlora(model::LlamaForCausalLMImpl& m, const std::vector<int32_t>& tokens,
                                     int64_t seq_len, int64_t stride, int64_t batch_size,
                                     const std::string& source, int64_t loss_chunk = 2048);

}  // namespace longlora::eval
