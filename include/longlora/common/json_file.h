// Reading a JSON file with the project's one-line errors ("PATH: cannot open",
// "PATH: bad JSON: ...").
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

namespace longlora {

// JSON nested deeper than this is refused where it is read. nlohmann copies, compares
// and prints values recursively: a run_config.json nested 200,000 deep (or a
// trainer_state.json record 60,000 deep) crashed a resume. Our files and Hugging
// Face's are a few levels deep.
inline constexpr int kMaxJsonDepth = 64;

// A parser callback that refuses JSON nested deeper than kMaxJsonDepth, naming
// `where` (a file, or FILE:LINE), for nlohmann's parse(text, callback).
template <typename Json>
typename Json::parser_callback_t json_depth_limit(const std::string& where);

// reject_duplicate_keys: a key twice in one object is an error (JSON parsers keep
// the last silently; for our own config files that hides a mistake). Nested deeper
// than kMaxJsonDepth: an error.
nlohmann::json read_json_file(const std::string& path, bool reject_duplicate_keys = false);

// One line of a .jsonl file; `where` ("FILE:LINE") names it in the error for bad JSON,
// a NUL byte (nlohmann stops at one and ignores the rest of the line) or nesting
// deeper than kMaxJsonDepth.
nlohmann::json parse_json_line(const std::string& line, const std::string& where);

// A value as JSON for a one-line message, cut after about max_chars. Safe for any
// value a file can hold: nlohmann's dump() recurses once per nesting level, and a
// value nested 100000 deep (a 200 KB file) overflowed the stack.
std::string json_brief(const nlohmann::json& v, size_t max_chars = 80);

// Typed reads of one JSON object's fields, for the Hugging Face json files we read
// (config.json, adapter_config.json, trainer_state.json): a wrong type is one line
// "SOURCE: FIELD: expected T, got V", never nlohmann's message without file or field.
// An absent field and a null one both read as not given (std::nullopt).
class JsonFields {
 public:
  // `obj` must be a JSON object ("SOURCE[: PREFIX]: expected a JSON object" if not);
  // `prefix` names a nested object in messages ("rope_scaling").
  JsonFields(const nlohmann::json& obj, std::string source, std::string prefix = "");
  bool given(const std::string& key) const;  // present and not null
  std::optional<bool> boolean(const std::string& key) const;
  std::optional<int64_t> integer(const std::string& key) const;
  std::optional<double> number(const std::string& key) const;  // finite
  std::optional<std::string> string(const std::string& key) const;
  std::optional<std::vector<std::string>> strings(const std::string& key) const;
  std::optional<JsonFields> object(const std::string& key) const;
  const nlohmann::json& at(const std::string& key) const;  // given(key) must hold
  std::string field(const std::string& key) const;        // "PREFIX.KEY" for messages
  const std::string& source() const { return src_; }
  [[noreturn]] void fail(const std::string& key, const std::string& message) const;
  // "expected WHAT, got <the value as JSON>"
  [[noreturn]] void expected(const std::string& key, const std::string& what) const;

 private:
  const nlohmann::json* j_;
  std::string src_, prefix_;
};

}  // namespace longlora
