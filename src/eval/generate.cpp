#include "longlora/eval/generate.h"

#include <algorithm>
#include <numeric>

#include "longlora/common/error.h"
#include "longlora/model/loader.h"

namespace longlora::eval {

int sample_token(const torch::Tensor& logits_in, double temperature, double top_p, std::mt19937_64& rng,
                 int64_t n_ids, int64_t top_k) {
  // Only the first n_ids can be chosen: a model's vocab may have rows past the
  // tokenizer's pieces (LongAlpaca's 32001 for 32000), which decode() refuses.
  auto logits = logits_in.reshape({-1});
  if (n_ids > 0 && n_ids < logits.numel()) logits = logits.slice(0, 0, n_ids);
  if (temperature <= 0) return static_cast<int>(logits.argmax().item<int64_t>());
  // The max logit comes off before the division: logits / 1e-308 overflowed to inf,
  // softmax gave NaN and id 0 came out. Shifted, every term is <= 0, so a tiny T
  // sends the rest to -inf (probability 0) and tends to greedy as it should.
  auto l64 = logits.to(torch::kCPU, torch::kFloat64);
  auto p = torch::softmax((l64 - l64.max()) / temperature, -1).contiguous();
  const double* pp = p.data_ptr<double>();
  const auto V = static_cast<size_t>(p.numel());
  std::vector<int> order(V);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return pp[a] > pp[b]; });
  // transformers' order: temperature, then top-k, then top-p on what top-k left.
  // Top-k keeps every token whose probability reaches the k-th largest (ties too,
  // as TopKLogitsWarper's `scores < kth` removes only those below).
  size_t candidates = V;
  if (top_k > 0 && static_cast<size_t>(top_k) < V) {
    const double kth = pp[order[static_cast<size_t>(top_k) - 1]];
    candidates = static_cast<size_t>(top_k);
    while (candidates < V && pp[order[candidates]] >= kth) ++candidates;
  }
  double kept_mass = 0;
  for (size_t i = 0; i < candidates; ++i) kept_mass += pp[order[i]];
  // Nucleus: the most probable tokens until their share of the candidates' mass
  // reaches top_p (at least one), as transformers' TopPLogitsWarper keeps them.
  double mass = 0;
  size_t keep = 0;
  while (keep < candidates && (keep == 0 || mass < top_p * kept_mass)) mass += pp[order[keep++]];
  // 53 random bits -> [0, 1), the same on every standard library.
  const double u = static_cast<double>(rng() >> 11) * 0x1.0p-53 * mass;
  double acc = 0;
  for (size_t i = 0; i < keep; ++i) {
    acc += pp[order[i]];
    if (u < acc) return order[i];
  }
  return order[keep - 1];
}

bool is_stop_token(const model::LlamaForCausalLMImpl& m, const data::Tokenizer& tok, int id) {
  const auto& l = m.cfg.eos_token_ids;
  return (tok.has_eos() && id == tok.eos_id()) || std::find(l.begin(), l.end(), id) != l.end();
}

std::vector<int> generate(model::LlamaForCausalLMImpl& m, const data::Tokenizer& tok,
                          const std::vector<int>& prompt_ids, const GenerateOptions& o,
                          const std::function<bool(int)>& on_token) {
  if (prompt_ids.empty()) throw Error(o.context + ": the prompt has no tokens");
  for (int id : prompt_ids)
    if (id < 0 || id >= m.cfg.vocab_size)
      throw Error(o.context + ": prompt token id " + std::to_string(id) + " is outside the model's vocab_size " +
                  std::to_string(m.cfg.vocab_size));
  std::vector<int> out;
  if (o.max_new_tokens <= 0) return out;

  torch::NoGradGuard no_grad;
  m.eval();
  const auto dev = m.head_weight().device();
  auto as_tensor = [&](const int* p, int64_t n) {
    return torch::from_blob(const_cast<int*>(p), {1, n}, torch::kInt32).to(dev, torch::kInt64);
  };
  // Logits (vocab,) of the last position only: an (L, vocab) fp32 tensor of a long
  // prompt would be large and is never needed.
  auto last_logits = [&](const torch::Tensor& h) { return m.logits(h.slice(1, h.size(1) - 1)).reshape({-1}); };

  std::vector<int> seq = prompt_ids;
  model::KVCache cache;
  torch::Tensor logits;
  auto feed_cached = [&](const int* p, int64_t n) {
    const int64_t chunk = o.prefill_chunk > 0 ? o.prefill_chunk : dev.is_cuda() ? n : 512;
    for (int64_t s = 0; s < n; s += chunk) {
      const int64_t e = std::min(n, s + chunk);
      model::ForwardOptions f;  // full attention
      f.cache = &cache;
      f.position_offset = cache.length;  // tokens already cached
      auto h = m.hidden(as_tensor(p + s, e - s), f);
      if (e == n) logits = last_logits(h);
    }
  };
  if (o.use_cache) feed_cached(seq.data(), static_cast<int64_t>(seq.size()));

  std::mt19937_64 rng(o.seed);
  for (int64_t step = 0; step < o.max_new_tokens; ++step) {
    if (!o.use_cache) logits = last_logits(m.hidden(as_tensor(seq.data(), static_cast<int64_t>(seq.size())), {}));
    // NaN logits would sample garbage (or argmax id 0) and print it as an answer.
    if (!torch::isfinite(logits).all().item<bool>())
      throw Error(o.context + ": non-finite logits at new token " + std::to_string(step + 1) + ": " +
                  model::explain_non_finite(m));
    const int id = sample_token(logits, o.temperature, o.top_p, rng, tok.vocab_size(), o.top_k);
    out.push_back(id);
    seq.push_back(id);
    const bool go_on = !on_token || on_token(id);
    if (!go_on || (o.stop_at_eos && is_stop_token(m, tok, id)) || step + 1 == o.max_new_tokens) break;
    if (o.use_cache) feed_cached(&seq.back(), 1);
  }
  return out;
}

namespace {

// decode() marks an incomplete UTF-8 sequence (byte-fallback pieces still to come)
// with U+FFFD; such a tail is held back until the character is complete.
bool ends_incomplete(const std::string& s) {
  return s.size() >= 3 && s.compare(s.size() - 3, 3, "\xEF\xBF\xBD") == 0;
}

}  // namespace

StreamDecoder::StreamDecoder(const data::Tokenizer& tok, int context_id) : tok_(tok), ids_{context_id} {
  skip_ = tok_.decode(ids_).size();
}

std::string StreamDecoder::push(int id) {
  ids_.push_back(id);
  const auto text = tok_.decode(ids_);
  if (ends_incomplete(text)) return {};
  std::string piece = text.size() > skip_ ? text.substr(skip_) : std::string();
  // Everything so far is out: restart from the last id as the context, so that
  // each push decodes a few ids instead of the whole generation.
  ids_ = {id};
  skip_ = tok_.decode(ids_).size();
  return piece;
}

std::string StreamDecoder::finish() {
  const auto text = tok_.decode(ids_);
  std::string piece = text.size() > skip_ ? text.substr(skip_) : std::string();
  ids_ = {ids_.back()};
  skip_ = tok_.decode(ids_).size();
  return piece;
}

}  // namespace longlora::eval
