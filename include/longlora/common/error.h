// User-facing errors: one line that names the file and the field at fault.
// Everything the user can get wrong (config, checkpoint, data, flags) throws
// longlora::Error; main() prints what() on one line and exits non-zero.
// Internal bugs use TORCH_CHECK / assertions instead.
#pragma once

#include <stdexcept>
#include <string>

namespace longlora {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

// "FILE: FIELD: MESSAGE" (FIELD may be empty).
[[noreturn]] inline void fail(const std::string& file, const std::string& field,
                              const std::string& message) {
  std::string s = file;
  if (!field.empty()) s += (s.empty() ? "" : ": ") + field;
  s += (s.empty() ? "" : ": ") + message;
  throw Error(s);
}

}  // namespace longlora
