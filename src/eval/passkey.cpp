#include "longlora/eval/passkey.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <random>

#include "longlora/common/error.h"
#include "longlora/eval/generate.h"

namespace longlora::eval {

const char* const kPasskeyTask =
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there.";
const char* const kPasskeyFiller =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";
const char* const kPasskeyQuestion = "What is the pass key? The pass key is";

std::string passkey_info_line(int64_t key) {
  const auto k = std::to_string(key);
  return "The pass key is " + k + ". Remember it. " + k + " is the pass key.";
}

int64_t passkey_filler_chars(int64_t target_tokens, double chars_per_token) {
  // Python: int(3.75 * L // 1024 * 1024). 3.75 * L and the division by 1024 are
  // exact in double for any realistic L, so floor() gives the same integer.
  return static_cast<int64_t>(std::floor(chars_per_token * static_cast<double>(target_tokens) / 1024.0)) * 1024;
}

double passkey_chars_per_token(const data::Tokenizer& tok) {
  // Marginal cost of a repetition in the middle of the filler (the first one
  // carries sentencepiece's dummy-prefix space and is left out).
  const std::string f = kPasskeyFiller;
  const auto one = tok.encode(passkey_filler(static_cast<int64_t>(f.size()))).size();
  const auto eleven = tok.encode(passkey_filler(11 * static_cast<int64_t>(f.size()) + 10)).size();
  if (eleven <= one) throw Error("passkey: the tokenizer gives no tokens for the filler text");
  return 10.0 * static_cast<double>(f.size() + 1) / static_cast<double>(eleven - one);
}

std::string passkey_filler(int64_t chars) {
  // LongLoRA slices " ".join([filler] * 5000) and asserts it is long enough (about
  // 445k characters, ~118k tokens); here the repetition simply goes on as needed.
  std::string s;
  if (chars <= 0) return s;
  const std::string f = kPasskeyFiller;
  s.reserve(static_cast<size_t>(chars) + f.size() + 1);
  while (static_cast<int64_t>(s.size()) < chars) {
    if (!s.empty()) s += ' ';
    s += f;
  }
  s.resize(static_cast<size_t>(chars));
  return s;
}

PasskeyPrompt passkey_prompt(int64_t target_tokens, int64_t key, int64_t split, double chars_per_token) {
  if (target_tokens <= 0)
    throw Error("passkey: length " + std::to_string(target_tokens) + " is not a positive token count");
  if (target_tokens > kPasskeyMaxLength)
    throw Error("passkey: length " + std::to_string(target_tokens) + " is above the maximum " +
                std::to_string(kPasskeyMaxLength));
  PasskeyPrompt p;
  p.filler_chars = passkey_filler_chars(target_tokens, chars_per_token);
  if (split < 0 || split > p.filler_chars)
    throw Error("passkey: split " + std::to_string(split) + " is outside [0, " +
                std::to_string(p.filler_chars) + "]");
  // Both pieces are prefixes of the same filler string (LongLoRA's garbage_inf[:n]).
  p.prompt = std::string(kPasskeyTask) + "\n" + passkey_filler(split) + "\n" + passkey_info_line(key) +
             "\n" + passkey_filler(p.filler_chars - split) + "\n" + kPasskeyQuestion;
  p.answer = std::to_string(key);
  return p;
}

PasskeyDraw passkey_draw(int64_t target_tokens, uint64_t seed, int64_t trial, double chars_per_token) {
  std::seed_seq seq{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32),
                    static_cast<uint32_t>(trial), static_cast<uint32_t>(static_cast<uint64_t>(trial) >> 32)};
  std::mt19937_64 rng(seq);
  // Modulo rather than std::uniform_int_distribution, whose algorithm differs
  // between standard libraries; the bias (n / 2^64) is nil.
  const auto n = static_cast<uint64_t>(passkey_filler_chars(target_tokens, chars_per_token));
  PasskeyDraw d;
  const uint64_t r_split = rng();
  d.split = n > 0 ? static_cast<int64_t>(r_split % n) : 0;
  d.key = 1 + static_cast<int64_t>(rng() % 49999);
  return d;
}

bool passkey_trial(model::LlamaForCausalLMImpl& m, const data::Tokenizer& tok, const PasskeyPrompt& p,
                   bool use_cache, int64_t* prompt_tokens, std::string* answered, const std::string& context) {
  std::vector<int> ids{tok.bos_id()};
  const auto body = tok.encode(p.prompt);
  ids.insert(ids.end(), body.begin(), body.end());
  if (prompt_tokens) *prompt_tokens = static_cast<int64_t>(ids.size());
  // LongLoRA: tokenizer(answer).input_ids[:, 1:], i.e. the key encoded on its own
  // (with sentencepiece's leading "▁"), BOS dropped; that many tokens are generated.
  const auto answer = tok.encode(p.answer);
  GenerateOptions g;
  g.max_new_tokens = static_cast<int64_t>(answer.size());
  g.temperature = 0;  // greedy (num_beams=1, no sampling)
  g.use_cache = use_cache;
  g.context = context;
  // An EOS before the last answer token makes the output shorter: a miss either way.
  const auto out = generate(m, tok, ids, g);
  if (answered) *answered = tok.decode(out);
  return out == answer;
}

std::string passkey_verdict(bool correct, const std::string& answered) {
  // {:?} quotes and escapes the answer, so a trial stays one log line.
  return correct ? "correct" : fmt::format("wrong (answered {:?})", answered);
}

std::vector<std::string> passkey_length_warnings(const data::Tokenizer& tok, const std::vector<int64_t>& lengths,
                                                 double chars_per_token, std::vector<int64_t>* prompt_tokens) {
  std::vector<std::string> out;
  if (prompt_tokens) prompt_tokens->clear();
  for (size_t i = 0; i < lengths.size(); ++i) {
    const int64_t L = lengths[i];
    const int64_t chars = passkey_filler_chars(L, chars_per_token);
    // Same filler length: the same draws (seeded by trial, split modulo the filler),
    // so the very same prompts; the test at both lengths is one test.
    for (size_t j = 0; j < i; ++j)
      if (passkey_filler_chars(lengths[j], chars_per_token) == chars) {
        out.push_back(fmt::format("passkey lengths {} and {} give the same prompts ({} filler characters: "
                                  "LongLoRA's filler is a multiple of 1024 characters)",
                                  lengths[j], L, chars));
        break;
      }
    // Trial 0's prompt stands for all: the others differ only in the key's digits.
    const auto d = passkey_draw(L, 0, 0, chars_per_token);
    const auto n = static_cast<int64_t>(tok.encode(passkey_prompt(L, d.key, d.split, chars_per_token).prompt).size()) + 1;
    if (prompt_tokens) prompt_tokens->push_back(n);
    if (4 * std::llabs(n - L) > L)
      out.push_back(fmt::format("passkey length {}: the prompt is {} tokens, more than 25% away ({} filler "
                                "characters: LongLoRA's filler is a multiple of 1024 characters)",
                                L, n, chars));
  }
  return out;
}

PasskeyResult passkey_eval(model::LlamaForCausalLMImpl& m, const data::Tokenizer& tok,
                           const PasskeyOptions& o) {
  if (o.trials <= 0) throw Error("passkey: --trials must be positive, got " + std::to_string(o.trials));
  PasskeyResult r;
  r.trials = o.trials;
  r.chars_per_token = o.chars_per_token > 0 ? o.chars_per_token : passkey_chars_per_token(tok);
  spdlog::info("passkey: {:.4g} filler characters a token ({})", r.chars_per_token,
               o.chars_per_token > 0 ? "given" : "measured on the tokenizer; LLaMA's gives LongLoRA's 3.75");
  // Lengths past the context the model was trained for are the point of the test
  // (the base model at 4x), but a long run there should not come as a surprise.
  // The prompts that run, not the requested length, are what must fit: LongLoRA's
  // filler is rounded, so --lengths 128 runs 157-token prompts. Trial 0's prompt
  // stands for a length's before the run; a later one a token or two longer (the
  // key's digits) is caught as it runs.
  const double context = static_cast<double>(m.cfg.max_position_embeddings) * m.cfg.rope_factor;
  std::vector<int64_t> first_prompt;
  const auto length_warnings = passkey_length_warnings(tok, o.lengths, r.chars_per_token, &first_prompt);
  std::vector<bool> warned(o.lengths.size(), false);
  auto warn_context = [&](size_t i, int64_t prompt) {
    const int64_t L = o.lengths[i];
    if (warned[i] || !(context > 0) || static_cast<double>(std::max(L, prompt)) <= context) return;
    warned[i] = true;
    if (static_cast<double>(L) > context)
      spdlog::warn("passkey length {} is past the model's context ({} positions x rope factor {:g} = {:g})", L,
                   m.cfg.max_position_embeddings, m.cfg.rope_factor, context);
    else
      spdlog::warn("passkey length {}: prompts of {} tokens are past the model's context ({} positions x rope "
                   "factor {:g} = {:g})",
                   L, prompt, m.cfg.max_position_embeddings, m.cfg.rope_factor, context);
  };
  for (size_t i = 0; i < o.lengths.size(); ++i) warn_context(i, first_prompt[i]);
  for (const auto& w : length_warnings) spdlog::warn("{}", w);
  const auto t0 = std::chrono::steady_clock::now();
  for (size_t li = 0; li < o.lengths.size(); ++li) {
    const int64_t L = o.lengths[li];
    int64_t passed = 0, tokens = 0, shortest = 0, longest = 0;
    for (int64_t t = 0; t < o.trials; ++t) {
      const auto d = passkey_draw(L, o.seed, t, r.chars_per_token);
      const auto p = passkey_prompt(L, d.key, d.split, r.chars_per_token);
      int64_t n = 0;
      std::string said;
      const bool ok = passkey_trial(m, tok, p, o.use_cache, &n, &said,
                                    fmt::format("passkey length {} trial {}", L, t + 1));
      warn_context(li, n);
      passed += ok;
      tokens += n;
      shortest = t == 0 ? n : std::min(shortest, n);
      longest = std::max(longest, n);
      const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      spdlog::info("passkey length {}: trial {}/{} ({} tokens, key {} after {} of {} filler chars): {} [{:.0f} s]",
                   L, t + 1, o.trials, n, d.key, d.split, p.filler_chars, passkey_verdict(ok, said), secs);
    }
    r.lengths.push_back(L);
    r.accuracy.push_back(static_cast<double>(passed) / static_cast<double>(o.trials));
    r.prompt_tokens.push_back(tokens / o.trials);
    r.prompt_tokens_min.push_back(shortest);
    r.prompt_tokens_max.push_back(longest);
  }
  return r;
}

}  // namespace longlora::eval
