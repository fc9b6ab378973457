#include "longlora/data/synthetic.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <unordered_map>
#include <nlohmann/json.hpp>
#include <random>
#include <unistd.h>
#include <vector>

#include "longlora/common/error.h"
#include "longlora/common/fs.h"
#include "longlora/common/interrupt.h"
#include "longlora/data/tokenizer.h"
#include "longlora/eval/passkey.h"

namespace fs = std::filesystem;

namespace longlora::data {
namespace {

// The output is written to a file beside it and renamed into place at the end, so a
// run that fails (no document fits, a full disk) leaves an existing file as it was.
class AsideFile {
 public:
  explicit AsideFile(const std::string& out)
      : out_(out), tmp_((fs::path(out).parent_path() / ("." + fs::path(out).filename().string() + ".tmp-" +
                                                         std::to_string(::getpid())))
                            .string()) {
    stream_.open(tmp_, std::ios::binary | std::ios::trunc);
    if (!stream_) fail(out_, "", "cannot write");
  }
  ~AsideFile() {
    if (!done_) {
      stream_.close();
      std::error_code ec;
      fs::remove(tmp_, ec);
    }
  }
  // Writes one line; a failed write (full disk) is an error right away, with the
  // system's reason while errno still holds it.
  void write(const std::string& line) {
    errno = 0;
    stream_ << line;
    check();
  }
  // Flushes and closes (the last block is written here), then renames over `out`.
  void commit() {
    errno = 0;
    stream_.close();
    check();
    std::error_code ec;
    fs::rename(tmp_, out_, ec);
    if (ec) fail(out_, "", "cannot rename the finished file into place: " + ec.message());
    done_ = true;
  }

 private:
  void check() {
    if (!stream_) fail(out_, "", std::string("write failed: ") + (errno ? std::strerror(errno) : "I/O error"));
  }
  std::string out_, tmp_;
  std::ofstream stream_;
  bool done_ = false;
};

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

// A copy drill: `line` repeated, one per line, as many times as fit `target` tokens,
// then the next repetition cut short to come closest to it from below; returned with
// its token count, nullopt when one line alone is too long. Lines join at "\n", which
// sentencepiece tokenizers that split on whitespace never merge across, so counts add
// and the drill is planned from the counts of one line and of its prefixes; the plan
// is confirmed by counting the whole text. Where that disagrees (a tokenizer whose
// counts do not add), the drill is built line by line on whole-text counts, which the
// plan reproduces where counts add (whole-text counting alone is quadratic: minutes a
// drill at 100k tokens).
template <class Count>
std::optional<std::pair<std::string, int64_t>> copy_drill(const std::string& line, int64_t target,
                                                          const Count& count) {
  auto repeat = [&](int64_t k) {
    std::string t = line;
    for (int64_t i = 1; i < k; ++i) t += "\n" + line;
    return t;
  };
  // `text` (of `text_tokens`) and the longest prefix of the next line within the
  // target (the first that reaches it), with its count by `tokens(prefix length)`.
  auto cut = [&](const std::string& text, int64_t text_tokens, const std::function<int64_t(size_t)>& tokens) {
    std::pair<std::string, int64_t> best{text, text_tokens};
    for (size_t c = 1; c < line.size(); ++c) {
      const int64_t n = tokens(c);
      if (n > target) break;
      best = {text + "\n" + line.substr(0, c), n};
      if (n == target) break;
    }
    return best;
  };
  const int64_t head = count(line), per = count("\n" + line);
  if (head > target) return std::nullopt;
  if (per > 0) {
    const int64_t k = 1 + (target - head) / per;
    std::string text = repeat(k);
    const int64_t n = count(text);
    if (n == head + (k - 1) * per && count(text + "\n" + line) == n + per) {
      const auto planned = cut(text, n, [&](size_t c) { return n + count("\n" + line.substr(0, c)); });
      if (count(planned.first) == planned.second) return planned;
    }
  }
  std::string text = line;
  int64_t n = head;
  for (int64_t m; (m = count(text + "\n" + line)) <= target; n = m) text += "\n" + line;
  return cut(text, n, [&](size_t c) { return count(text + "\n" + line.substr(0, c)); });
}

}  // namespace

int64_t write_passkey_corpus(const PasskeyCorpusOptions& o) {
  if (o.row_tokens == 0 && (o.min_tokens < 16 || o.max_tokens < o.min_tokens))
    throw Error("make-data: need 16 <= --min-tokens <= --max-tokens");
  if (o.row_tokens != 0 && o.row_tokens < 64) throw Error("make-data: --row-tokens must be at least 64");
  if (o.min_keys < 1 || o.max_keys < o.min_keys) throw Error("make-data: need 1 <= --min-keys <= --max-keys");
  if (o.max_asks < 1) throw Error("make-data: --max-asks must be at least 1");
  if (std::max(o.row_tokens, o.max_tokens) > kMaxDocumentTokens)
    throw Error("make-data: --max-tokens and --row-tokens must be at most " + std::to_string(kMaxDocumentTokens));
  // Training reads a .bin as uint16 tokens; JSON lines under that name would train on bytes.
  if (fs::path(o.out).extension() != ".jsonl") fail(o.out, "--out", "must end in .jsonl (make-data writes JSON lines)");
  {
    std::error_code ec;
    const auto st = fs::symlink_status(o.out, ec);
    check_not_directory(o.out, "--out");
    if (fs::exists(st)) {
      if (!o.overwrite) fail(o.out, "--out", "already exists (pass --overwrite to replace it)");
      // The finished file is renamed over --out: that must not replace a device or a link's target.
      if (!fs::is_regular_file(st)) fail(o.out, "--out", "is not a regular file");
      // --overwrite replaced the tokenizer it was reading (`--tokenizer t --out t`).
      if (fs::equivalent(o.out, o.tokenizer, ec))
        fail(o.out, "--out", "is the --tokenizer file; writing it would destroy the tokenizer");
    }
  }
  Tokenizer tok(o.tokenizer);
  const double cpt = eval::passkey_chars_per_token(tok);
  // Each count encodes a whole document (seconds at 4M tokens, ~25 per document): a
  // signal is answered between counts, not only between documents (minutes).
  const std::string interrupted = "interrupted: nothing written to " + o.out;
  auto count = [&](const std::string& t) {
    check_interrupt(interrupted);
    return static_cast<int64_t>(tok.encode(t).size());
  };
  // The shortest skeleton (task line, info lines and questions, no filler; the
  // shortest key "1") must fit the longest document, for the fewest and the most keys
  // and for the most questions; otherwise documents would exceed the length or
  // (exact mode) never be found. Counted per part, as the search below does.
  // --copy-frac 1 writes copy drills only: no skeleton to fit.
  if (o.copy_frac < 1) {
    const bool exact = o.row_tokens > 0;
    const int64_t limit = exact ? o.row_tokens - 2 : o.max_tokens;
    const std::string limit_flag = exact ? "--row-tokens " + std::to_string(o.row_tokens) + " (" +
                                               std::to_string(limit) + " tokens a document)"
                                         : "--max-tokens " + std::to_string(o.max_tokens);
    const double task = static_cast<double>(count(std::string(eval::kPasskeyTask) + "\n"));
    const double info = static_cast<double>(count("\n" + eval::passkey_info_line(1) + "\n"));
    const double ask = static_cast<double>(count("\n" + std::string(eval::kPasskeyQuestion) + " 1."));
    const double nl = static_cast<double>(count("\n"));
    // Doubles: the flags are not bounded above, and the products must not overflow.
    auto need = [&](double keys, double asks) { return task + keys * (info + ask) + (keys - 1) * nl + (asks - 1) * (ask + nl); };
    auto check = [&](const std::string& what, double keys, double asks) {
      const double n = need(keys, asks);
      if (n > static_cast<double>(limit))
        throw Error("make-data: " + what + " need at least " +
                    (n < 9e18 ? std::to_string(static_cast<int64_t>(n)) : std::string("2^63")) +
                    " tokens without filler, more than " + limit_flag + ": lower them or raise " +
                    (exact ? "--row-tokens" : "--max-tokens"));
    };
    check("--min-keys " + std::to_string(o.min_keys) + " keys with one question each",
          static_cast<double>(o.min_keys), 1);
    check("--max-keys " + std::to_string(o.max_keys) + " keys with one question each",
          static_cast<double>(o.max_keys), 1);
    check("--min-keys " + std::to_string(o.min_keys) + " keys, one asked --max-asks " +
              std::to_string(o.max_asks) + " times,",
          static_cast<double>(o.min_keys), static_cast<double>(o.max_asks));
  }
  std::mt19937_64 rng(o.seed);
  auto uniform = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  AsideFile file(o.out);
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
    const std::string flag = o.row_tokens > 0 ? "--row-tokens " + std::to_string(o.row_tokens)
                                              : "--max-tokens " + std::to_string(o.max_tokens);
    throw Error("make-data: " + std::to_string(kMaxMisses) + " draws in a row did not fit " + flag +
                " (the task line, --min-keys " + std::to_string(o.min_keys) +
                " info lines and up to --max-asks " + std::to_string(o.max_asks) +
                " questions each): lower them or raise " + flag.substr(0, flag.find(' ')));
  };
  auto emit = [&](const std::string& text) {
    file.write(nlohmann::json({{"text", text}}).dump() + "\n");
    ++written;
    misses = 0;
  };
  while (written < o.docs) {
    // A signal stops before the next document; ~AsideFile removes the temporary.
    check_interrupt(interrupted);
    interrupt_test_pause();
    const bool exact = o.row_tokens > 0;
    const int64_t target = exact ? o.row_tokens - 2 : uniform(o.min_tokens, o.max_tokens);
    if (o.copy_frac > 0 && std::uniform_real_distribution<double>(0, 1)(rng) < o.copy_frac) {
      // A copy drill: one random string, one line per repetition, up to the length.
      static const std::string kChars = "bcdfghjkmpqvwxz0123456789";
      std::string line;
      for (int64_t n = uniform(8, 40); n > 0; --n)
        line += kChars[static_cast<size_t>(uniform(0, static_cast<int64_t>(kChars.size()) - 1))];
      const auto drill = copy_drill(line, target, count);
      if (!drill) {
        missed();
        continue;
      }
      if (exact && drill->second != target) {
        missed();
        continue;
      }
      emit(drill->first);
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
        // The keys and questions alone are longer than this draw's target. Without
        // filler the document is still within the range when it fits --max-tokens;
        // past it, it is a miss (it was written anyway before).
        if (exact || n > o.max_tokens) return std::nullopt;
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
        const std::string pad = "\n" + eval::passkey_filler(c);
        padded = text + pad;
        n = by_parts ? base + count(pad) : count(padded);
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
  check_interrupt(interrupted);
  file.commit();
  return written;
}

}  // namespace longlora::data
