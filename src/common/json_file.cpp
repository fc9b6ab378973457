#include "longlora/common/json_file.h"

#include <cmath>
#include <fstream>
#include <sstream>
#include <set>
#include <vector>

#include "longlora/common/error.h"
#include "longlora/common/fs.h"

namespace longlora {

template <typename Json>
typename Json::parser_callback_t json_depth_limit(const std::string& where) {
  return [where](int depth, typename Json::parse_event_t ev, Json&) {
    if ((ev == Json::parse_event_t::object_start || ev == Json::parse_event_t::array_start) && depth >= kMaxJsonDepth)
      fail(where, "", "JSON nested deeper than " + std::to_string(kMaxJsonDepth) + " levels: refused");
    return true;
  };
}
template nlohmann::json::parser_callback_t json_depth_limit<nlohmann::json>(const std::string&);
template nlohmann::ordered_json::parser_callback_t json_depth_limit<nlohmann::ordered_json>(const std::string&);

nlohmann::json read_json_file(const std::string& path, bool reject_duplicate_keys) {
  using nlohmann::json;
  check_not_directory(path);
  std::ifstream in(path);
  if (!in) fail(path, "", "cannot open");
  // One set of keys per open object, and the dotted path to it, for the message.
  std::vector<std::set<std::string>> keys;
  std::vector<std::string> where;
  std::string last_key;
  const auto too_deep = json_depth_limit<json>(path);
  json::parser_callback_t cb = [&](int depth, json::parse_event_t ev, json& v) {
    too_deep(depth, ev, v);
    if (!reject_duplicate_keys) return true;
    switch (ev) {
      case json::parse_event_t::object_start:
        where.push_back(keys.empty() ? "" : last_key);
        keys.emplace_back();
        break;
      case json::parse_event_t::object_end:
        keys.pop_back();
        where.pop_back();
        break;
      case json::parse_event_t::key: {
        last_key = v.get<std::string>();
        if (!keys.back().insert(last_key).second) {
          std::string p;
          for (size_t i = 1; i < where.size(); ++i) p += where[i] + ".";
          fail(path, p + last_key, "appears twice");
        }
        break;
      }
      default:
        break;
    }
    return true;
  };
  std::ostringstream buf;
  buf << in.rdbuf();
  const std::string text = std::move(buf).str();
  // nlohmann takes a NUL for the end of the input and ignores what follows.
  if (const auto z = text.find('\0'); z != std::string::npos)
    fail(path, "", "a NUL byte at offset " + std::to_string(z) + ": not a JSON text");
  try {
    return json::parse(text, cb);
  } catch (const json::exception& e) {
    fail(path, "", std::string("bad JSON: ") + e.what());
  }
}

using nlohmann::json;

json parse_json_line(const std::string& line, const std::string& where) {
  if (const auto z = line.find('\0'); z != std::string::npos)
    fail(where, "", "a NUL byte at column " + std::to_string(z + 1) + ": not a JSON text");
  try {
    return json::parse(line, json_depth_limit<json>(where));
  } catch (const json::exception& e) {
    fail(where, "", std::string("bad JSON: ") + e.what());
  }
}

// ---------------------------------------------------------------------------
// JsonFields

namespace {
// Appends v to out until out passes `limit`; the recursion is as deep as the part of
// the value that fits, so at most `limit` levels.
void brief_into(const json& v, std::string& out, size_t limit) {
  if (out.size() > limit) return;
  if (v.is_array() || v.is_object()) {
    out += v.is_array() ? '[' : '{';
    bool first = true;
    for (auto it = v.begin(); it != v.end() && out.size() <= limit; ++it) {
      if (!first) out += ',';
      first = false;
      if (v.is_object()) out += json(it.key()).dump(-1, ' ', false, json::error_handler_t::replace) + ':';
      brief_into(it.value(), out, limit);
    }
    out += v.is_array() ? ']' : '}';
  } else {
    // A scalar: no recursion. Invalid UTF-8 in a string would make dump() throw.
    out += v.dump(-1, ' ', false, json::error_handler_t::replace);
  }
}
}  // namespace

std::string json_brief(const json& v, size_t max_chars) {
  std::string s;
  brief_into(v, s, max_chars);
  return s.size() > max_chars ? s.substr(0, max_chars - 3) + "..." : s;
}

JsonFields::JsonFields(const json& obj, std::string source, std::string prefix)
    : j_(&obj), src_(std::move(source)), prefix_(std::move(prefix)) {
  if (!obj.is_object()) ::longlora::fail(src_, prefix_, "expected a JSON object, got " + json_brief(obj));
}

bool JsonFields::given(const std::string& key) const {
  return j_->contains(key) && !(*j_)[key].is_null();
}

const json& JsonFields::at(const std::string& key) const { return (*j_)[key]; }

std::string JsonFields::field(const std::string& key) const {
  if (prefix_.empty()) return key;
  return key.empty() ? prefix_ : prefix_ + "." + key;
}

void JsonFields::fail(const std::string& key, const std::string& message) const {
  ::longlora::fail(src_, field(key), message);
}

void JsonFields::expected(const std::string& key, const std::string& what) const {
  fail(key, "expected " + what + ", got " + json_brief(at(key)));
}

std::optional<bool> JsonFields::boolean(const std::string& key) const {
  if (!given(key)) return std::nullopt;
  if (!at(key).is_boolean()) expected(key, "true or false");
  return at(key).get<bool>();
}

std::optional<int64_t> JsonFields::integer(const std::string& key) const {
  if (!given(key)) return std::nullopt;
  const json& v = at(key);
  // An unsigned above INT64_MAX would wrap to a negative value.
  if (!v.is_number_integer() ||
      (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)))
    expected(key, "an integer");
  return v.get<int64_t>();
}

std::optional<double> JsonFields::number(const std::string& key) const {
  if (!given(key)) return std::nullopt;
  if (!at(key).is_number() || !std::isfinite(at(key).get<double>())) expected(key, "a number");
  return at(key).get<double>();
}

std::optional<std::string> JsonFields::string(const std::string& key) const {
  if (!given(key)) return std::nullopt;
  if (!at(key).is_string()) expected(key, "a string");
  return at(key).get<std::string>();
}

std::optional<std::vector<std::string>> JsonFields::strings(const std::string& key) const {
  if (!given(key)) return std::nullopt;
  const json& v = at(key);
  if (!v.is_array()) expected(key, "a list of strings");
  std::vector<std::string> out;
  for (const auto& s : v) {
    if (!s.is_string()) expected(key, "a list of strings");
    out.push_back(s.get<std::string>());
  }
  return out;
}

std::optional<JsonFields> JsonFields::object(const std::string& key) const {
  if (!given(key)) return std::nullopt;
  if (!at(key).is_object()) expected(key, "an object or null");
  return JsonFields(at(key), src_, field(key));
}

}  // namespace longlora
