#include "longlora/eval/perplexity.h"

#include <spdlog/spdlog.h>

#include <chrono>
#include <cmath>

#include "longlora/common/error.h"
#include "longlora/data/tokens.h"

namespace longlora::eval {

void check_windows(int64_t n, int64_t L, const std::string& source) {
  if (L < n) return;  // L + 1 <= n, written so that it cannot overflow
  throw Error(source + ": " + std::to_string(n) + " tokens are too few for one window of seq_len " +
              std::to_string(L) + " (+1 target)");
}

PerplexityResult perplexity(model::LlamaForCausalLMImpl& m, const std::vector<int32_t>& tokens,
                            int64_t L, int64_t S, const std::string& source, int64_t loss_chunk) {
  if (S <= 0) S = L;
  check_windows(static_cast<int64_t>(tokens.size()), L, source);
  const auto starts = data::window_starts(static_cast<int64_t>(tokens.size()), L, S);
  torch::NoGradGuard no_grad;
  m.eval();
  const auto dev = m.head_weight().device();
  model::ForwardOptions opt;  // full attention
  double nll = 0;
  int64_t count = 0;
  const auto t0 = std::chrono::steady_clock::now();
  auto last = t0;
  for (size_t w = 0; w < starts.size(); ++w) {
    const int64_t s = starts[w];
    auto window = torch::from_blob(const_cast<int32_t*>(tokens.data() + s), {1, L + 1}, torch::kInt32)
                      .to(dev, torch::kInt64);
    auto ids = window.slice(1, 0, L), targets = window.slice(1, 1, L + 1);
    auto h = m.hidden(ids, opt);
    auto [sum, n] = model::chunked_nll(m, h, targets, loss_chunk);
    nll += sum.item<double>();
    count += n;
    const auto now = std::chrono::steady_clock::now();
    if (now - last > std::chrono::seconds(5)) {
      last = now;
      const double secs = std::chrono::duration<double>(now - t0).count();
      spdlog::info("eval seq_len {}: window {}/{}, loss so far {:.4f}, {:.0f} tokens/s", L, w + 1,
                   starts.size(), nll / count, count / secs);
    }
  }
  PerplexityResult r;
  r.loss = nll / static_cast<double>(count);
  r.perplexity = std::exp(r.loss);
  r.tokens = count;
  r.windows = static_cast<int64_t>(starts.size());
  r.seq_len = L;
  return r;
}

void check_longlora_windows(int64_t n, int64_t L, int64_t S, const std::string& source) {
  // range(0, n - L, S) without its last start must keep one: n - L > S.
  if (n - L > S) return;
  throw Error(source + ": " + std::to_string(n) + " tokens leave no window of seq_len " + std::to_string(L) +
              " under LongLoRA's protocol (window starts range(0, n - L, " + std::to_string(S) +
              ") without the last one: it needs more than seq_len + stride tokens)");
}

PerplexityResult perplexity_longlora(model::LlamaForCausalLMImpl& m, const std::vector<int32_t>& tokens,
                                     int64_t L, int64_t S, int64_t batch_size, const std::string& source,
                                     int64_t loss_chunk) {
  if (L < 2 || S <= 0 || batch_size <= 0) throw Error("perplexity_longlora: seq_len >= 2, stride and batch size > 0");
  const int64_t n = static_cast<int64_t>(tokens.size());
  check_longlora_windows(n, L, S, source);
  std::vector<int64_t> starts;
  for (int64_t s = 0; s < n - L; s += S) starts.push_back(s);
  starts.pop_back();  // as eval.py's all_ix.pop()
  torch::NoGradGuard no_grad;
  m.eval();
  const auto dev = m.head_weight().device();
  model::ForwardOptions opt;  // full attention
  double batch_sum = 0, sum_of_batches = 0;
  int64_t in_batch = 0, batches = 0;
  auto last = std::chrono::steady_clock::now();
  for (size_t w = 0; w < starts.size(); ++w) {
    auto ids = torch::from_blob(const_cast<int32_t*>(tokens.data() + starts[w]), {1, L}, torch::kInt32)
                   .to(dev, torch::kInt64);
    // labels = input_ids, shifted inside the model: the last position predicts nothing.
    auto targets = torch::cat({ids.slice(1, 1, L), torch::full({1, 1}, -1, ids.options())}, 1);
    auto [sum, count] = model::chunked_nll(m, m.hidden(ids, opt), targets, loss_chunk);
    batch_sum += sum.item<double>() / static_cast<double>(count);
    if (++in_batch == batch_size || w + 1 == starts.size()) {
      sum_of_batches += batch_sum / static_cast<double>(in_batch);
      ++batches;
      batch_sum = 0;
      in_batch = 0;
    }
    const auto now = std::chrono::steady_clock::now();
    if (now - last > std::chrono::seconds(5)) {
      last = now;
      spdlog::info("eval seq_len {} (LongLoRA's protocol): window {}/{}", L, w + 1, starts.size());
    }
  }
  PerplexityResult r;
  r.loss = sum_of_batches / static_cast<double>(batches);
  r.perplexity = std::pow(2.71828, r.loss);  // eval.py's constant, not e
  r.tokens = static_cast<int64_t>(starts.size()) * (L - 1);
  r.windows = static_cast<int64_t>(starts.size());
  r.seq_len = L;
  return r;
}

}  // namespace longlora::eval
