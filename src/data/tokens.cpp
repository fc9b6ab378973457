#include "longlora/data/tokens.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>

#include "longlora/common/error.h"
#include "longlora/common/fs.h"
#include "longlora/common/json_file.h"
#include "longlora/common/strings.h"
#include "longlora/data/tokenizer.h"

namespace fs = std::filesystem;

namespace longlora::data {

namespace {
std::string ext_of(const std::string& path) { return fs::path(path).extension().string(); }
}  // namespace

void check_token_ids(const std::vector<int32_t>& ids, int64_t vocab, const std::string& source) {
  for (size_t i = 0; i < ids.size(); ++i)
    if (ids[i] < 0 || ids[i] >= vocab)
      throw Error(source + ": token " + std::to_string(i) + " is id " + std::to_string(ids[i]) +
                  ", outside the model's vocabulary of " + std::to_string(vocab));
}

void check_utf8(const std::string& text, const std::string& source) {
  const size_t i = invalid_utf8_at(text);
  if (i == std::string::npos) return;
  const auto line = 1 + std::count(text.begin(), text.begin() + static_cast<std::ptrdiff_t>(i), '\n');
  throw Error(source + ": line " + std::to_string(line) + ", byte " + std::to_string(i) +
              ": not valid UTF-8 (convert the file, e.g. iconv -f latin1 -t utf-8)");
}

namespace {

// A .bin's size in bytes, which must be whole uint16 ids.
size_t token_file_size(const std::string& path) {
  std::error_code ec;
  const auto size = static_cast<size_t>(fs::file_size(path, ec));
  if (ec) fail(path, "", "cannot read its size: " + ec.message());
  if (size % 2 != 0) fail(path, "", "odd byte count " + std::to_string(size) + ": not a uint16 token file");
  return size;
}

// A .jsonl document: its record's "text".
std::string document_text(const nlohmann::json& j, const std::string& where) {
  if (!j.is_object() || !j.contains("text") || !j["text"].is_string()) fail(where, "text", "missing or not a string");
  return j["text"].get<std::string>();
}

}  // namespace

std::optional<std::pair<std::string, std::string>> first_jsonl_line(const std::string& path) {
  std::ifstream in(path);
  if (!in) fail(path, "", "cannot open");
  std::string line;
  for (int64_t n = 1; std::getline(in, line); ++n)
    if (line.find_first_not_of(" \t\r") != std::string::npos) return std::make_pair(line, path + ":" + std::to_string(n));
  return std::nullopt;
}

std::optional<int64_t> check_token_stream_head(const std::string& path) {
  check_regular_file(path);
  if (token_stream_reader(path) == "tokens") return static_cast<int64_t>(token_file_size(path) / 2);
  if (ext_of(path) == ".jsonl")
    if (const auto first = first_jsonl_line(path)) (void)document_text(parse_json_line(first->first, first->second), first->second);
  return std::nullopt;
}

std::vector<int32_t> read_bin(const std::string& path) {
  check_regular_file(path);
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path, "", "cannot open");
  const size_t size = token_file_size(path);
  // Read in slices straight into the ids: the whole file as bytes beside them (grown by
  // doubling) took up to 3.8x the file's size at the peak, GBs for a large corpus.
  std::vector<int32_t> ids(size / 2);
  std::vector<unsigned char> buf(1 << 20);
  size_t done = 0;
  while (done < ids.size()) {
    const size_t n = std::min(buf.size() / 2, ids.size() - done);
    if (!in.read(reinterpret_cast<char*>(buf.data()), static_cast<std::streamsize>(2 * n)))
      fail(path, "", "read failed after " + std::to_string(2 * done) + " of " + std::to_string(size) + " bytes");
    for (size_t i = 0; i < n; ++i) ids[done + i] = buf[2 * i] | (buf[2 * i + 1] << 8);
    done += n;
  }
  return ids;
}

void write_bin(const std::string& path, const std::vector<int32_t>& ids) {
  std::ofstream out(path, std::ios::binary);
  if (!out) fail(path, "", "cannot write");
  for (auto id : ids) {
    if (id < 0 || id > 65535) fail(path, "", "token id " + std::to_string(id) + " does not fit uint16");
    const char b[2] = {static_cast<char>(id & 0xff), static_cast<char>((id >> 8) & 0xff)};
    out.write(b, 2);
  }
  if (!out) fail(path, "", "write failed");
}

std::string token_stream_reader(const std::string& path) {
  const std::string ext = ext_of(path);
  if (ext == ".bin") return "tokens";
  if (ext == ".txt" || ext == ".jsonl") return "text";
  fail(path, "", "unknown data extension '" + ext + "' (expected .bin, .txt or .jsonl)");
}

std::vector<std::string> read_documents(const std::string& path) {
  check_regular_file(path);
  if (token_stream_reader(path) != "text") fail(path, "", "token ids (.bin), not text documents");
  std::ifstream in(path);
  if (!in) fail(path, "", "cannot open");
  std::vector<std::string> docs;
  if (ext_of(path) == ".txt") {
    docs.emplace_back((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    check_utf8(docs.back(), path);  // as .jsonl's parser checks its strings
    return docs;
  }
  std::string line;
  int64_t lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = path + ":" + std::to_string(lineno);
    docs.push_back(document_text(parse_json_line(line, where), where));
  }
  return docs;
}

std::vector<int32_t> load_token_stream(const std::string& path, const Tokenizer* tok) {
  if (token_stream_reader(path) == "tokens") return read_bin(path);
  auto docs = read_documents(path);
  if (!tok) fail(path, "", "text data needs the model's tokenizer.model");
  std::vector<int32_t> out;
  // In slices, so that the per-document id vectors never hold more than a slice's worth
  // next to the stream.
  constexpr size_t kSlice = 8192;
  for (size_t s = 0; s < docs.size(); s += kSlice) {
    const std::vector<std::string> slice(std::make_move_iterator(docs.begin() + s),
                                        std::make_move_iterator(docs.begin() + std::min(docs.size(), s + kSlice)));
    const auto encoded =
        tok->encode_all(slice, 0, [&](size_t j) { return path + ": document " + std::to_string(s + j + 1); });
    for (size_t j = 0; j < encoded.size(); ++j) {
      if (s + j > 0) out.push_back(tok->eos_id());
      out.push_back(tok->bos_id());
      out.insert(out.end(), encoded[j].begin(), encoded[j].end());
    }
  }
  return out;
}

std::vector<int64_t> window_starts(int64_t n, int64_t L, int64_t S) {
  // Written so that no sum can overflow: L and S come from the command line.
  std::vector<int64_t> out;
  if (L < 0 || S <= 0) return out;
  for (int64_t s = 0; L < n - s; ) {  // s + L + 1 <= n
    out.push_back(s);
    if (S > n - s) break;
    s += S;
  }
  return out;
}

}  // namespace longlora::data
