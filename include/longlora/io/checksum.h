// Checksums of a training checkpoint's files: recorded in its trainer_state.json at
// save ("files": name -> bytes and CRC-32) and checked at load. The size alone passed
// a file whose bytes changed after the save (zeroed by a sync placeholder or a copy
// onto a preallocated file, a flipped bit): it loaded as weights and trained on.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <string>

namespace longlora::io {

struct FileDigest {
  uint64_t bytes = 0;
  uint32_t crc32 = 0;  // CRC-32 as zlib and Python's zlib.crc32 compute it
  void add(const void* p, size_t n);  // the next n bytes of the file
};

FileDigest digest_file(const std::string& path);

// {"NAME": {"bytes": N, "crc32": "8 hex digits"}, ...} for every regular file in dir.
// A file named in `written` takes that digest, made by its writer as the bytes went
// out, instead of reading it back (a full fine-tune's 80 GB checkpoint took ~90 s).
nlohmann::json digest_directory(const std::string& dir, const std::map<std::string, FileDigest>& written = {});

// Checks the files that dir/trainer_state.json's "files" records (all of them, or
// all but the optimizer state (optimizer.safetensors, or state.pt before format 2)
// when with_optimizer_state is false: eval and export read no
// optimizer state). Checkpoints saved before checksums were recorded pass unchecked.
void verify_checkpoint_files(const std::string& dir, bool with_optimizer_state);
// The same, from a trainer_state.json already read (its path names it in errors).
void verify_checkpoint_files(const std::string& dir, const nlohmann::json& trainer_state,
                             const std::string& trainer_state_path, bool with_optimizer_state);

}  // namespace longlora::io
