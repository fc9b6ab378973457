#include "longlora/data/dataset.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <spdlog/spdlog.h>

#include "longlora/common/error.h"
#include "longlora/common/fs.h"
#include "longlora/common/json_file.h"
#include "longlora/data/tokenizer.h"
#include "longlora/data/tokens.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace longlora::data {

std::string sft_prompt(const SftRecord& r, const std::string& style) {
  if (style == "none") return r.instruction;
  if (!r.input.empty())
    return "Below is an instruction that describes a task, paired with an input that provides "
           "further context. Write a response that appropriately completes the request.\n\n"
           "### Instruction:\n" + r.instruction + "\n\n### Input:\n" + r.input + "\n\n### Response:";
  return "Below is an instruction that describes a task. Write a response that appropriately "
         "completes the request.\n\n### Instruction:\n" + r.instruction + "\n\n### Response:";
}

namespace {

SftRecord parse_record(const json& j, const std::string& where) {
  if (!j.is_object()) fail(where, "", "expected an object with instruction and output");
  auto get = [&](const char* k, bool required) -> std::string {
    if (!j.contains(k) || j[k].is_null()) {
      if (required) fail(where, k, "missing");
      return "";
    }
    if (!j[k].is_string()) fail(where, k, "must be a string");
    return j[k].get<std::string>();
  };
  return {get("instruction", true), get("input", false), get("output", true), where};
}

void check_rows(int64_t tokens, int64_t seq_len, const std::string& path) {
  if (tokens / seq_len == 0)
    fail(path, "", std::to_string(tokens) + " tokens make no complete row of seq_len " + std::to_string(seq_len));
}

void check_prompt_style(const SftRecord& r, const std::string& style) {
  if (style == "none" && !r.input.empty())
    fail(r.where, "input",
         "not empty, but data.sft_prompt \"none\" has no place for it (LongLoRA's script drops it): "
         "put it in the instruction, or use data.sft_prompt \"alpaca\"");
}

bool looks_like_sft(const std::string& path) {
  const auto first = first_jsonl_line(path);
  if (!first) return false;
  try {
    const auto j = json::parse(first->first);
    return j.is_object() && j.contains("instruction");
  } catch (const json::exception&) {
    return false;
  }
}

}  // namespace

std::vector<SftRecord> read_sft_records(const std::string& path) {
  check_regular_file(path);
  std::ifstream in(path);
  if (!in) fail(path, "", "cannot open");
  std::vector<SftRecord> out;
  if (fs::path(path).extension() == ".json") {
    // The whole file is one value: `in >> j` stopped after the first and dropped the
    // rest (garbage, or a second array of records from `cat a.json b.json`).
    const json j = read_json_file(path);
    if (!j.is_array()) fail(path, "", "expected a JSON array of {instruction, input, output} records");
    for (size_t i = 0; i < j.size(); ++i)
      out.push_back(parse_record(j[i], path + ": record " + std::to_string(i)));
    return out;
  }
  std::string line;
  int64_t n = 0;
  while (std::getline(in, line)) {
    ++n;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = path + ":" + std::to_string(n);
    out.push_back(parse_record(parse_json_line(line, where), where));
  }
  return out;
}

void check_data_head(const std::string& path, const std::string& reader, const std::string& sft_prompt_style,
                     int64_t seq_len) {
  if (reader != "sft") {
    if (const auto ids = check_token_stream_head(path)) check_rows(*ids, seq_len, path);
    // Documents' token counts need the tokenizer; a .jsonl of none is seen without.
    else if (fs::path(path).extension() == ".jsonl" && !first_jsonl_line(path)) check_rows(0, seq_len, path);
    return;
  }
  // A .json of records is one value: its check is the run's whole parse.
  if (fs::path(path).extension() != ".jsonl") return;
  if (const auto first = first_jsonl_line(path))
    check_prompt_style(parse_record(parse_json_line(first->first, first->second), first->second), sft_prompt_style);
}

std::string data_reader(const std::string& path, const std::string& format, bool* guessed_sft) {
  if (!fs::exists(path)) fail(path, "", "data file not found");
  check_regular_file(path);
  const std::string ext = fs::path(path).extension().string();
  std::string kind = format;
  // The formats that read each extension, one table for auto's choice and the check of
  // an explicit format: a format the extension contradicts would read the file as
  // something it is not (text read a .bin as tokens; tokens read text bytes as ids).
  const std::vector<std::string> readers = ext == ".bin"     ? std::vector<std::string>{"tokens"}
                                           : ext == ".txt"   ? std::vector<std::string>{"text"}
                                           : ext == ".json"  ? std::vector<std::string>{"sft"}
                                           : ext == ".jsonl" ? std::vector<std::string>{"text", "sft"}
                                                             : std::vector<std::string>{};
  if (kind == "auto") {
    if (readers.empty())
      fail(path, "", "unknown data extension '" + ext + "' (expected .bin, .txt, .json or .jsonl)");
    const bool sft = readers.size() == 2 && looks_like_sft(path);
    if (guessed_sft) *guessed_sft = sft;
    kind = readers.size() == 1 ? readers[0] : sft ? "sft" : "text";
  } else if (std::find(readers.begin(), readers.end(), kind) == readers.end()) {
    fail(path, "data.format", kind + " does not read a '" + ext + "' file (auto picks " +
                                  (readers.empty()       ? "nothing: .bin, .txt, .json or .jsonl are read"
                                   : readers.size() == 1 ? readers[0]
                                                         : readers[0] + " or " + readers[1]) +
                                  " for it)");
  }
  return kind;
}

Dataset::Dataset(const std::string& path, const std::string& format, int64_t L,
                 const Tokenizer* tok, int64_t vocab, const std::string& prompt_style) : seq_len_(L) {
  bool guessed_sft = false;  // a .jsonl taken as instruction data by its first record
  kind_ = data_reader(path, format, &guessed_sft);
  auto check_ids = [&](const std::vector<int32_t>& ids) { check_token_ids(ids, vocab, path); };
  if (kind_ == "tokens" || kind_ == "text") {
    stream_ = kind_ == "tokens" ? read_bin(path) : load_token_stream(path, tok);
    check_ids(stream_);
    n_rows_ = static_cast<int64_t>(stream_.size()) / L;
    check_rows(static_cast<int64_t>(stream_.size()), L, path);
    return;
  }
  if (!tok) fail(path, "", "instruction data needs the model's tokenizer.model");
  pad_id_ = tok->eos_id();
  std::vector<SftRecord> records;
  try {
    records = read_sft_records(path);
  } catch (const Error& e) {
    if (!guessed_sft) throw;
    throw Error(std::string(e.what()) +
                " (read as instruction data: the first record has \"instruction\"; data.format=text reads it as text)");
  }
  // As LongLoRA's supervised-fine-tune.py: prompt + output tokenized as one text, the
  // first as many tokens as the prompt alone has masked. (Tokenized apart, every output
  // began with sentencepiece's word-initial "▁", a token LongLoRA never trains on.)
  // On every core, a slice of records at a time.
  constexpr size_t kSlice = 4096;
  for (size_t s0 = 0; s0 < records.size(); s0 += kSlice) {
    const size_t n = std::min(kSlice, records.size() - s0);
    std::vector<std::string> texts;
    for (size_t j = 0; j < n; ++j) {
      check_prompt_style(records[s0 + j], prompt_style);
      const std::string prompt = sft_prompt(records[s0 + j], prompt_style);
      texts.push_back(prompt);
      texts.push_back(prompt + records[s0 + j].output);
    }
    const auto encoded =
        tok->encode_all(texts, 0, [&](size_t i) { return path + ": record " + std::to_string(s0 + i / 2 + 1); });
    for (size_t j = 0; j < n; ++j) {
      const auto& whole = encoded[2 * j + 1];
      std::vector<int32_t> ids{tok->bos_id()};
      const size_t prompt_len = ids.size() + encoded[2 * j].size();
      ids.insert(ids.end(), whole.begin(), whole.end());
      ids.push_back(tok->eos_id());
      const bool cut = static_cast<int64_t>(ids.size()) > L;
      if (cut) ids.resize(L);
      check_ids(ids);
      // Nothing to predict: every next token is the prompt's.
      if (prompt_len >= ids.size()) {
        ++dropped_;
        continue;
      }
      truncated_ += cut;
      // Kept unpadded (row() pads): LongAlpaca's 12k records padded to 32k tokens
      // were 3 GB of ids and targets.
      ids.shrink_to_fit();
      sft_ids_.push_back(std::move(ids));
      sft_prompt_len_.push_back(static_cast<int32_t>(prompt_len));
    }
  }
  check_ids({pad_id_});
  n_rows_ = static_cast<int64_t>(sft_ids_.size());
  if (n_rows_ == 0)
    fail(path, "", "no record has output tokens within seq_len " + std::to_string(L));
  // Counts, not a line per record: a corpus can have thousands of long ones.
  if (dropped_ > 0 || truncated_ > 0)
    spdlog::warn("{}: {} of {} records dropped (the prompt fills seq_len {}), {} truncated (output cut at seq_len)",
                 path, dropped_, records.size(), L, truncated_);
}

Row Dataset::row(int64_t i) const {
  Row r;
  if (!sft_ids_.empty()) {
    const auto& ids = sft_ids_[i];
    const size_t prompt_len = sft_prompt_len_[i];
    // targets[j] = ids[j+1] when ids[j+1] belongs to the output (or EOS); right-padded.
    r.ids.assign(ids.begin(), ids.end());
    r.ids.resize(seq_len_, pad_id_);
    r.targets.assign(seq_len_, -1);
    for (size_t j = prompt_len - 1; j + 1 < ids.size(); ++j) r.targets[j] = ids[j + 1];
    return r;
  }
  const auto* b = stream_.data() + i * seq_len_;
  r.ids.assign(b, b + seq_len_);
  r.targets.assign(b + 1, b + seq_len_);
  r.targets.push_back(-1);
  return r;
}

std::vector<int64_t> permutation(int64_t n, uint64_t seed, int64_t epoch) {
  std::vector<int64_t> p(n);
  for (int64_t i = 0; i < n; ++i) p[i] = i;
  std::mt19937_64 rng(seed * 1000003ULL + static_cast<uint64_t>(epoch));
  for (int64_t i = n - 1; i > 0; --i) {  // Fisher-Yates with our own bounded draw
    const int64_t j = static_cast<int64_t>(rng() % static_cast<uint64_t>(i + 1));
    std::swap(p[i], p[j]);
  }
  return p;
}

Row Dataset::row_at(int64_t cursor, bool shuffle, uint64_t seed) const {
  const int64_t epoch = cursor / n_rows_, pos = cursor % n_rows_;
  if (!shuffle) return row(pos);
  if (perm_epoch_ != epoch || perm_seed_ != seed) {
    perm_ = permutation(n_rows_, seed, epoch);
    perm_epoch_ = epoch;
    perm_seed_ = seed;
  }
  return row(perm_[pos]);
}

}  // namespace longlora::data
