#include "longlora/common/json_file.h"

#include <fstream>
#include <set>
#include <vector>

#include "longlora/common/error.h"

namespace longlora {

nlohmann::json read_json_file(const std::string& path, bool reject_duplicate_keys) {
  using nlohmann::json;
  std::ifstream in(path);
  if (!in) fail(path, "", "cannot open");
  // One set of keys per open object, and the dotted path to it, for the message.
  std::vector<std::set<std::string>> keys;
  std::vector<std::string> where;
  std::string last_key;
  json::parser_callback_t cb = [&](int, json::parse_event_t ev, json& v) {
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
  try {
    return reject_duplicate_keys ? json::parse(in, cb) : json::parse(in);
  } catch (const json::exception& e) {
    fail(path, "", std::string("bad JSON: ") + e.what());
  }
}

}  // namespace longlora
