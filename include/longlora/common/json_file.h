// Reading a JSON file with the project's one-line errors ("PATH: cannot open",
// "PATH: bad JSON: ...").
#pragma once

#include <nlohmann/json.hpp>
#include <string>

namespace longlora {

nlohmann::json read_json_file(const std::string& path);

}  // namespace longlora
