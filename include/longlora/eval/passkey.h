// Passkey retrieval, as LongLoRA's passkey_retrivial.py (after Landmark Attention):
// a 5-digit-ish key hidden at a random depth in repeated filler text; the model
// must repeat it after "What is the pass key? The pass key is" (greedy, exact match).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "longlora/data/tokenizer.h"
#include "longlora/model/llama.h"

namespace longlora::eval {

extern const char* const kPasskeyTask;      // the first line
extern const char* const kPasskeyFiller;    // one repetition of the irrelevant text
extern const char* const kPasskeyQuestion;  // the last line
// The hidden line: "The pass key is {k}. Remember it. {k} is the pass key."
std::string passkey_info_line(int64_t key);

// The longest target length eval --task passkey takes (2^22 tokens, 32x LLaMA-3's
// 128k): the filler is built as one string of about 4 characters a token, and a
// length in the billions ran out of memory after minutes instead of being refused.
constexpr int64_t kPasskeyMaxLength = int64_t{1} << 22;

// LongLoRA's characters-per-token ratio. It is what LLaMA's tokenizer gives on the
// filler: each " " + sentence (90 characters) is 24 tokens.
constexpr double kPasskeyLlamaCharsPerToken = 3.75;

// Characters of filler (prefix + suffix together) for a target length in tokens:
// LongLoRA's int(3.75 * L // 1024 * 1024), i.e. chars-per-token x L rounded down
// to a multiple of 1024 characters.
int64_t passkey_filler_chars(int64_t target_tokens, double chars_per_token = kPasskeyLlamaCharsPerToken);

// The tokenizer's characters per token on the filler: (characters of 10 more
// " " + sentence repetitions) / (the tokens they add). 3.75 exactly for LLaMA's
// tokenizer, so LongLoRA's lengths are reproduced there; other tokenizers (e.g. a
// small test vocabulary cutting the filler into 2.5x the tokens) still land near
// the requested length instead of far above it.
double passkey_chars_per_token(const data::Tokenizer& tok);
// The first `chars` characters of the filler repeated and joined by single spaces
// (it may end mid-sentence, as LongLoRA slices its long filler string).
std::string passkey_filler(int64_t chars);

struct PasskeyPrompt {
  std::string prompt;  // without BOS (the evaluation prepends it)
  std::string answer;  // the key in decimal
  int64_t filler_chars = 0;
};

// The prompt for a target length in tokens, a key and a split: `split` is the
// number of filler characters before the key line, in [0, filler_chars]; the rest
// (filler_chars - split, counted from the filler's start again) comes after it.
// Lines joined by "\n": task, prefix filler, info line, suffix filler, question.
PasskeyPrompt passkey_prompt(int64_t target_tokens, int64_t key, int64_t split,
                             double chars_per_token = kPasskeyLlamaCharsPerToken);

// The random split and key of one trial, as LongLoRA draws them (split first,
// then key): split uniform in [0, filler_chars) (0 when there is no filler) and
// key uniform in [1, 50000) (numpy's randint(1, 50000) excludes 50000).
// Each trial has its own generator, std::mt19937_64 seeded from (seed, trial),
// like LongLoRA's seed = trial index, so a trial's key and relative depth do not
// depend on which other lengths are run.
struct PasskeyDraw {
  int64_t split = 0, key = 0;
};
PasskeyDraw passkey_draw(int64_t target_tokens, uint64_t seed, int64_t trial,
                         double chars_per_token = kPasskeyLlamaCharsPerToken);

struct PasskeyOptions {
  std::vector<int64_t> lengths;  // target lengths in tokens
  int64_t trials = 10;           // LongLoRA's num_tests
  uint64_t seed = 0;
  bool use_cache = true;         // LongLoRA recomputes without a cache; the result is the same
  double chars_per_token = 0;    // 0: passkey_chars_per_token(tokenizer)
};

struct PasskeyResult {
  std::vector<int64_t> lengths;
  std::vector<double> accuracy;         // per length, in [0, 1]
  // Prompt lengths (with BOS) per length as run: mean, shortest, longest. LongLoRA's
  // filler is rounded to 1024 characters, so these are what a "length" measured.
  std::vector<int64_t> prompt_tokens, prompt_tokens_min, prompt_tokens_max;
  int64_t trials = 0;
  double chars_per_token = 0;           // the ratio used
};

// One trial: BOS + the prompt, greedy generation of as many tokens as the answer
// encodes to (the tokenizer's encoding of the key alone, without BOS), exact match.
// `prompt_tokens` receives the prompt's length in tokens (with BOS); `answered` the
// generated text, decoded; `context` starts generation's error messages.
bool passkey_trial(model::LlamaForCausalLMImpl& m, const data::Tokenizer& tok,
                   const PasskeyPrompt& p, bool use_cache, int64_t* prompt_tokens = nullptr,
                   std::string* answered = nullptr, const std::string& context = "passkey");

// A trial's verdict for the log: "correct", or "wrong (answered "...")" with the answer
// quoted and escaped. A dropped last digit and swapped digits are different failures.
std::string passkey_verdict(bool correct, const std::string& answered);

// Warns (before any trial) where two requested lengths give the same prompts (the
// same filler after LongLoRA's rounding) and where a length's prompt is more than
// 25% away from it; those are the checks below, exposed for tests. `prompt_tokens`,
// when given, receives each length's trial-0 prompt length in tokens (with BOS).
std::vector<std::string> passkey_length_warnings(const data::Tokenizer& tok, const std::vector<int64_t>& lengths,
                                                 double chars_per_token,
                                                 std::vector<int64_t>* prompt_tokens = nullptr);

PasskeyResult passkey_eval(model::LlamaForCausalLMImpl& m, const data::Tokenizer& tok,
                           const PasskeyOptions& o);

}  // namespace longlora::eval
