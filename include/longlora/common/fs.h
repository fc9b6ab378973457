// Filesystem helpers that must not go through std::filesystem::remove_all: PyPI's
// libtorch.so exports its own copy of the libstdc++fs symbols, the binary binds to
// it, and that copy crashes removing a non-empty directory (seen with torch 2.11).
#pragma once

#include <string>

namespace longlora {

// rm -rf: removes `path` and everything below it; a missing path is fine.
// Returns false (errno set) when something could not be removed.
bool remove_tree(const std::string& path);

// "PATH: is a directory, a file is expected" (an Error) when `path` is a directory:
// an ifstream opens one and fails later with a message that names no file
// ("basic_filebuf::underflow ... Is a directory"), or reads it as empty.
// `field` (a flag, say) goes in the message after the path when given.
void check_not_directory(const std::string& path, const std::string& field = "");

// check_not_directory, and "PATH: is not a regular file" for a FIFO, socket or device:
// data is read more than once (its format sniffed, then its rows), and a FIFO without
// a writer blocked the run for good.
void check_regular_file(const std::string& path, const std::string& field = "");

// `path` made absolute, with the folder it lies in as the OS resolves it (symlinks,
// ".."), and its own name kept (a symlink there stays one). Normalized as text,
// "link/../model" named another directory than the one the OS opens. "" stays "".
std::string resolved_path(const std::string& path);

}  // namespace longlora
