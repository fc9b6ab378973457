// Token streams for evaluation and pretraining-style data:
//   .bin   raw little-endian uint16 token ids (LongLoRA's and nanoGPT's format)
//   .txt   one document, tokenized with the model's tokenizer.model, BOS first
//   .jsonl one JSON object per line with a "text" field, each document BOS + tokens
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace longlora::data {

class Tokenizer;

// "SOURCE: token I is id X, outside the model's vocabulary of V" for the first id
// outside [0, vocab).
void check_token_ids(const std::vector<int32_t>& ids, int64_t vocab, const std::string& source);

// "SOURCE: line L, byte B: not valid UTF-8 ..." at the first byte that is not part of
// well-formed UTF-8 (RFC 3629: no overlongs, surrogates or code points past U+10FFFF),
// as a JSON parser holds .jsonl strings to. sentencepiece would otherwise take a
// Latin-1 file quietly, every accented letter turned into U+FFFD.
void check_utf8(const std::string& text, const std::string& source);

std::vector<int32_t> read_bin(const std::string& path);
void write_bin(const std::string& path, const std::vector<int32_t>& ids);

// Documents of a .txt (one) or .jsonl (one per line) file, with line numbers in errors.
std::vector<std::string> read_documents(const std::string& path);

// How load_token_stream reads `path`, by its extension: "tokens" (.bin) or "text"
// (.txt; a .jsonl's "text" fields). Any other extension fails, naming it.
std::string token_stream_reader(const std::string& path);

// A .jsonl's first line that is not blank, with "path:N" for errors; nullopt if none.
std::optional<std::pair<std::string, std::string>> first_jsonl_line(const std::string& path);
// What can be checked of a token stream without reading it all (a run's preflight): a
// .bin's size is whole uint16 ids (returned: their count), a .jsonl's first record has
// its "text" (nullopt for text: its count needs the tokenizer).
std::optional<int64_t> check_token_stream_head(const std::string& path);

// The whole file as one stream; .txt/.jsonl documents each start with BOS and are
// joined with EOS. Training and evaluation both read text this way, so a held-out
// file is scored on the stream a model trained on such files has seen.
std::vector<int32_t> load_token_stream(const std::string& path, const Tokenizer* tok);

// Windows for perplexity: starts 0, S, 2S, ... while start + L + 1 <= n.
std::vector<int64_t> window_starts(int64_t n_tokens, int64_t seq_len, int64_t stride);

}  // namespace longlora::data
