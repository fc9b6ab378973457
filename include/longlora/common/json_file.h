// Reading a JSON file with the project's one-line errors ("PATH: cannot open",
// "PATH: bad JSON: ...").
#pragma once

#include <nlohmann/json.hpp>
#include <string>

namespace longlora {

// reject_duplicate_keys: a key twice in one object is an error (JSON parsers keep
// the last silently; for our own config files that hides a mistake).
nlohmann::json read_json_file(const std::string& path, bool reject_duplicate_keys = false);

}  // namespace longlora
