#include "longlora/common/fs.h"

#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <filesystem>

#include "longlora/common/error.h"

namespace longlora {

bool remove_tree(const std::string& path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) return errno == ENOENT;
  if (!S_ISDIR(st.st_mode)) return ::unlink(path.c_str()) == 0;
  // Depth-first (FTW_DEPTH) so directories are empty when removed; no symlink following.
  return ::nftw(path.c_str(),
                [](const char* p, const struct stat*, int, struct FTW*) { return std::remove(p); },
                64, FTW_DEPTH | FTW_PHYS) == 0;
}

void check_not_directory(const std::string& path, const std::string& field) {
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) fail(path, field, "is a directory, a file is expected");
}

void check_regular_file(const std::string& path, const std::string& field) {
  check_not_directory(path, field);
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0 && !S_ISREG(st.st_mode)) fail(path, field, "is not a regular file");
}

std::string resolved_path(const std::string& path) {
  namespace fs = std::filesystem;
  if (path.empty()) return path;
  fs::path p = fs::absolute(fs::path(path));
  if (p.filename().empty()) p = p.parent_path();  // "dir/"
  std::error_code ec;
  if (p.filename() == "." || p.filename() == "..") {
    const fs::path r = fs::weakly_canonical(p, ec);
    return (ec ? p.lexically_normal() : r).string();
  }
  const fs::path parent = fs::weakly_canonical(p.parent_path(), ec);
  return ((ec ? p.parent_path().lexically_normal() : parent) / p.filename()).string();
}

}  // namespace longlora
