// Training rows of seq_len tokens with per-position targets (-1 = not counted):
//   tokens/text: documents (BOS first) joined with EOS and cut into rows; targets
//                are the next token inside the row (the last position has none);
//   sft:         LongAlpaca/Alpaca records {instruction, input?, output}, one per
//                row: BOS + prompt + output + EOS, loss only on output and EOS,
//                right-padded (padding never counted), truncated to seq_len.
// Deterministic order: a Fisher-Yates permutation per epoch from the seed.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace longlora::data {

class Tokenizer;

struct Row {
  std::vector<int32_t> ids, targets;  // both seq_len long
};

struct SftRecord {
  std::string instruction, input, output;
  std::string where;  // "file:LINE" (.jsonl) or "file: record I" (.json), for errors
};

// The text before the output. "alpaca": LongLoRA's first prompt (Alpaca's template),
// with or without an input; "none": the instruction alone, as LongLoRA's
// supervised-fine-tune.py has it since Nov 2023 (it has no place for an input).
std::string sft_prompt(const SftRecord& r, const std::string& style = "alpaca");
// Records of a .json (array) or .jsonl file; errors name the record / line.
std::vector<SftRecord> read_sft_records(const std::string& path);

// The reader a data file gets: "tokens", "text" or "sft" for `format` auto (by the
// extension; a .jsonl by its first record) or the format given, checked against the
// extension. Errors name the file (and data.format); nothing past the first record is
// read, so a dry run can check it. `guessed_sft`: set when auto took a .jsonl as
// instruction records.
std::string data_reader(const std::string& path, const std::string& format, bool* guessed_sft = nullptr);
// What a run's preflight can check of the data without reading it all, as `reader`
// (data_reader's) reads it: a .bin's size (whole ids, at least one row of seq_len), a
// .jsonl's first record (its "text", or an instruction record's fields and
// data.sft_prompt's rule for `input`).
void check_data_head(const std::string& path, const std::string& reader, const std::string& sft_prompt_style,
                     int64_t seq_len);

class Dataset {
 public:
  // format: auto | tokens | text | sft; prompt_style: sft_prompt's, for instruction records.
  Dataset(const std::string& path, const std::string& format, int64_t seq_len,
          const Tokenizer* tok, int64_t vocab_size, const std::string& prompt_style = "alpaca");
  int64_t size() const { return n_rows_; }
  int64_t seq_len() const { return seq_len_; }
  const std::string& kind() const { return kind_; }
  // sft: records left out because BOS + prompt fills seq_len (nothing to predict),
  // and records whose output (or EOS) was cut at seq_len. Logged as a warning.
  int64_t dropped() const { return dropped_; }
  int64_t truncated() const { return truncated_; }
  // The row at absolute position `cursor` of the endless shuffled sequence.
  Row row_at(int64_t cursor, bool shuffle, uint64_t seed) const;

 private:
  Row row(int64_t i) const;
  std::string kind_;
  int64_t seq_len_ = 0, n_rows_ = 0, dropped_ = 0, truncated_ = 0;
  int32_t pad_id_ = 0;
  std::vector<int32_t> stream_;                         // tokens/text
  std::vector<std::vector<int32_t>> sft_ids_;            // sft: BOS, prompt, output, EOS (cut at seq_len)
  std::vector<int32_t> sft_prompt_len_;                  // sft: BOS + prompt tokens, never trained on
  mutable int64_t perm_epoch_ = -1;                     // this epoch's order, cached
  mutable uint64_t perm_seed_ = 0;
  mutable std::vector<int64_t> perm_;
};

// A deterministic permutation of [0, n) for (seed, epoch).
std::vector<int64_t> permutation(int64_t n, uint64_t seed, int64_t epoch);

}  // namespace longlora::data
