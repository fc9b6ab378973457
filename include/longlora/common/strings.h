// Small string helpers shared by the checkpoint readers (C++17 has no ends_with).
#pragma once

#include <string>

namespace longlora {

inline bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace longlora
