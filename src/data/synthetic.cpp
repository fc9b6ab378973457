#include "longlora/data/synthetic.h"

#include <algorithm>
#include <fstream>
#include <optional>
#include <unordered_map>
#include <nlohmann/json.hpp>
#include <random>
#include <vector>

#include "longlora/common/error.h"
#include "longlora/data/tokenizer.h"
#include "longlora/eval/passkey.h"

namespace longlora::data {
namespace {

// One document's layout: a list of parts, each either fixed text or a stretch of
// filler whose length is a share (weight) of the document's filler budget.
struct Part {
  std::string text;
  double weight = -1;  // >= 0: filler
};

std::string render(const std::vector<Part>& parts, int64_t filler_chars) {
  std::string s;
  for (const auto& p : parts)
    s += p.weight >= 0 ? eval::passkey_filler(static_cast<int64_t>(p.weight * static_cast<double>(filler_chars)))
                       : p.text;
  return s;
}

}  // namespace

int64_t write_passkey_corpus(const PasskeyCorpusOptions& o) {
  if (o.row_tokens == 0 && (o.min_tokens < 16 || o.max_tokens < o.min_tokens))
    throw Error("make-data: need 16 <= --min-tokens <= --max-tokens");
  if (o.row_tokens != 0 && o.row_tokens < 64) throw Error("make-data: --row-tokens must be at least 64");
  if (o.min_keys < 1 || o.max_keys < o.min_keys) throw Error("make-data: need 1 <= --min-keys <= --max-keys");
  if (o.max_asks < 1) throw Error("make-data: --max-asks must be at least 1");
  Tokenizer tok(o.tokenizer);
  const double cpt = eval::passkey_chars_per_token(tok);
  std::mt19937_64 rng(o.seed);
  auto uniform = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  std::ofstream out(o.out);
  if (!out) throw Error(o.out + ": cannot write");
  auto count = [&](const std::string& t) { return static_cast<int64_t>(tok.encode(t).size()); };
  std::unordered_map<int64_t, int64_t> filler_cache;  // filler characters -> tokens
  auto filler_tokens = [&](int64_t chars) {
    auto [it, fresh] = filler_cache.try_emplace(chars, 0);
    if (fresh) it->second = count(eval::passkey_filler(chars));
    return it->second;
  };
  int64_t written = 0;
  // Exact-length documents are drawn until one fits; settings where none (or almost
  // none) can fit would otherwise loop for ever.
  constexpr int kMaxMisses = 2000;
  int misses = 0;
  auto missed = [&] {
    if (++misses < kMaxMisses) return;
    throw Error("make-data: " + std::to_string(kMaxMisses) + " draws in a row did not fit --row-tokens " +
                std::to_string(o.row_tokens) + " (the task line, --min-keys " + std::to_string(o.min_keys) +
                " info lines and up to --max-asks " + std::to_string(o.max_asks) +
                " questions each): lower them or raise --row-tokens");
  };
  auto emit = [&](const std::string& text) {
    out << nlohmann::json({{"text", text}}).dump() << "\n";
    ++written;
    misses = 0;
  };
  while (written < o.docs) {
    const bool exact = o.row_tokens > 0;
    const int64_t target = exact ? o.row_tokens - 2 : uniform(o.min_tokens, o.max_tokens);
    if (o.copy_frac > 0 && std::uniform_real_distribution<double>(0, 1)(rng) < o.copy_frac) {
      // A copy drill: one random string, one line per repetition, up to the length.
      static const std::string kChars = "bcdfghjkmpqvwxz0123456789";
      std::string line;
      for (int64_t n = uniform(8, 40); n > 0; --n)
        line += kChars[static_cast<size_t>(uniform(0, static_cast<int64_t>(kChars.size()) - 1))];
      std::string text = line;
      if (count(text) > target) {
        missed();
        continue;
      }
      while (count(text + "\n" + line) <= target) text += "\n" + line;
      // The last line cut short to land on the length (exactly, where a cut does).
      std::string best = text;
      for (size_t c = 1; c < line.size(); ++c) {
        const std::string longer = text + "\n" + line.substr(0, c);
        const int64_t n = count(longer);
        if (n > target) break;
        best = longer;
        if (n == target) break;
      }
      text = best;
      if (exact && count(text) != target) {
        missed();
        continue;
      }
      emit(text);
      continue;
    }
    // Layout: task line, then per key: filler, info line, and 1..max_asks times
    // (filler, question + answer). Filler shares are random (a key at any depth, its
    // questions at any distance); lines are joined by "\n" as in LongLoRA's prompt.
    std::vector<Part> parts{{std::string(eval::kPasskeyTask) + "\n"}};
    const int64_t keys = uniform(o.min_keys, o.max_keys);
    for (int64_t k = 0; k < keys; ++k) {
      const std::string key = std::to_string(uniform(1, 49999));
      if (k > 0) parts.push_back({"\n"});
      parts.push_back({"", 0});
      parts.push_back({"\n" + eval::passkey_info_line(std::stoll(key)) + "\n"});
      const int64_t asks = uniform(1, o.max_asks);
      for (int64_t a = 0; a < asks; ++a) {
        if (a > 0) parts.push_back({"\n"});
        parts.push_back({"", 0});
        parts.push_back({"\n" + std::string(eval::kPasskeyQuestion) + " " + key + "."});
      }
    }
    double total = 0;
    for (auto& p : parts)
      if (p.weight >= 0) total += (p.weight = std::exponential_distribution<double>(1.0)(rng));
    for (auto& p : parts)
      if (p.weight >= 0) p.weight /= total;
    // The filler budget (characters) whose document comes closest to the target
    // length from below: token counts grow with it, so a bisection finds it. Exact
    // mode then tops up with a few filler characters after the last answer (the
    // filler's tokens are short, so one of them lands on the length).
    //
    // Counting is the cost (a whole-document encode per probe, ~25 probes a
    // document). Every part boundary is a newline, which sentencepiece tokenizers
    // that split on whitespace never merge across, so a document's count is the sum
    // of its parts' counts, and filler counts can be cached by length. The search
    // runs on those sums first and the document it picks is encoded whole. Where the
    // two disagree (a tokenizer for which the parts do not add up), or where the sums
    // find no document, the search runs again on whole-document counts, so what is
    // written and what is skipped are those of the whole-document search.
    std::vector<int64_t> text_tokens(parts.size(), 0);
    for (size_t i = 0; i < parts.size(); ++i)
      if (parts[i].weight < 0) text_tokens[i] = count(parts[i].text);
    auto search = [&](bool by_parts) -> std::optional<std::pair<std::string, int64_t>> {
      auto tokens = [&](int64_t f) {
        if (!by_parts) return count(render(parts, f));
        int64_t n = 0;
        for (size_t i = 0; i < parts.size(); ++i)
          n += parts[i].weight >= 0
                   ? filler_tokens(static_cast<int64_t>(parts[i].weight * static_cast<double>(f)))
                   : text_tokens[i];
        return n;
      };
      int64_t lo = 0, hi = static_cast<int64_t>(cpt * static_cast<double>(target)) + 64;
      int64_t n = tokens(lo);  // always tokens(lo)
      if (n > target) {
        if (exact) return std::nullopt;  // the keys and questions alone are too long
        hi = lo;
      }
      while (lo < hi) {  // largest f with tokens(f) <= target
        const int64_t mid = (lo + hi + 1) / 2;
        if (const int64_t m = tokens(mid); m <= target) {
          lo = mid;
          n = m;
        } else {
          hi = mid - 1;
        }
      }
      std::string text = render(parts, lo);
      if (!exact) return std::make_pair(text, n);
      std::string padded = text;
      const int64_t base = n;
      for (int64_t c = 1; n != target && c < 64; ++c) {
        padded = text + "\n" + eval::passkey_filler(c);
        n = by_parts ? base + filler_tokens(c) : count(padded);
        if (n > target) break;
      }
      if (n != target) return std::nullopt;
      return std::make_pair(padded, n);
    };
    auto found = search(true);
    if (!found || count(found->first) != found->second) found = search(false);
    if (!found) {
      missed();
      continue;
    }
    emit(found->first);
  }
  if (!out) throw Error(o.out + ": write failed");
  return written;
}

}  // namespace longlora::data
