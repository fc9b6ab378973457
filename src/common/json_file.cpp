#include "longlora/common/json_file.h"

#include <fstream>

#include "longlora/common/error.h"

namespace longlora {

nlohmann::json read_json_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) fail(path, "", "cannot open");
  try {
    return nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    fail(path, "", std::string("bad JSON: ") + e.what());
  }
}

}  // namespace longlora
