// Autoregressive generation with full attention: greedy or temperature + top-p
// (nucleus) sampling, with or without a KV cache, stopping at EOS or after
// max_new_tokens. Used by `longlora-train generate` and the passkey test.
#pragma once

#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "longlora/data/tokenizer.h"
#include "longlora/model/llama.h"

namespace longlora::eval {

struct GenerateOptions {
  int64_t max_new_tokens = 512;  // LongLoRA's inference.py max_gen_len
  double temperature = 0.6;      // 0 = greedy (argmax); LongLoRA's inference.py default
  double top_p = 0.9;            // nucleus: smallest set of tokens whose probability reaches top_p
  int64_t top_k = 50;            // the k most probable tokens (ties kept) before top_p; 0 = off.
                                 // 50: what transformers' generate applies unless told
  uint64_t seed = 0;             // sampling RNG (std::mt19937_64)
  bool use_cache = true;         // false: every step recomputes the whole sequence
  bool stop_at_eos = true;
  // With the cache the prompt is fed in chunks of this many tokens; same result as one
  // pass. 0: the whole prompt at once on a GPU, where its first chunk runs the fused
  // attention (no scores), and 512 on the CPU, whose reference attention holds a
  // chunk's (heads, chunk, chunk) scores. Later chunks attend through the cache with
  // (heads, chunk, T) fp32 scores: 6.5 GB a chunk of 512 for a 7B at 100k tokens.
  int64_t prefill_chunk = 0;
  std::string context = "generate";  // what errors start with (passkey names its trial)
};

// Generates after `prompt_ids` (used as given: the caller prepends BOS) and returns
// the new token ids (the EOS that stopped it included), never an id the tokenizer
// lacks (a model vocab larger than the tokenizer's has rows no piece decodes to). `on_token` is called with
// each new id as soon as it is chosen; returning false stops generation.
std::vector<int> generate(model::LlamaForCausalLMImpl& m, const data::Tokenizer& tok,
                          const std::vector<int>& prompt_ids, const GenerateOptions& o,
                          const std::function<bool(int)>& on_token = {});

// Whether `id` ends a generation: the tokenizer's EOS or any eos_token_id of the
// model's config.json (a list: transformers' generate stops at each of them).
bool is_stop_token(const model::LlamaForCausalLMImpl& m, const data::Tokenizer& tok, int id);

// The next token from one row of logits (vocab,) under temperature, top_k (0 = off)
// and top_p, applied in transformers' order; `rng` is drawn from only when sampling
// (temperature > 0). Only ids below `n_ids` (> 0: the tokenizer's piece count) are
// chosen; generate() passes the tokenizer's. Exposed for tests.
int sample_token(const torch::Tensor& logits, double temperature, double top_p, std::mt19937_64& rng,
                 int64_t n_ids = 0, int64_t top_k = 0);

// Turns a stream of generated ids into text pieces to print: each push() returns
// the text the new id adds (possibly empty while a multi-byte character or a
// leading-space piece is incomplete). Decoding is done on the whole generated
// sequence behind a context token, so sentencepiece's word-initial spaces are kept.
class StreamDecoder {
 public:
  StreamDecoder(const data::Tokenizer& tok, int context_id);
  std::string push(int id);
  std::string finish();  // whatever is still held back

 private:
  const data::Tokenizer& tok_;
  std::vector<int> ids_;
  size_t skip_ = 0;  // bytes of decode(ids_) already returned (the context's)
};

}  // namespace longlora::eval
