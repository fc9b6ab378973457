// Small string helpers shared by the readers (C++17 has no ends_with).
#pragma once

#include <cstddef>
#include <string>

namespace longlora {

inline bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// The text up to its first line break: a library message's first line (LibTorch's
// carry a backtrace after it) for a one-line error.
inline std::string first_line(const std::string& m) { return m.substr(0, m.find('\n')); }

// The offset of the first byte that is not part of valid UTF-8 (overlongs,
// surrogates and code points past U+10FFFF included), or std::string::npos.
size_t invalid_utf8_at(const std::string& s);

}  // namespace longlora
