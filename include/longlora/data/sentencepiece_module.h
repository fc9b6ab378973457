// The C interface of longlora-sentencepiece.so, the module that holds sentencepiece.
//
// Why a module: the distribution's libsentencepiece exports symbols that LibTorch's
// libraries export too (an absl FLAGS_minloglevel of 32 bytes under the name of
// libc10's 4-byte int, protobuf-lite). Linked into the binary, sentencepiece's static
// constructor wrote over libc10's globals (it turned every CPU out-of-memory error
// into an abort). The tokenizer loads the module with dlmopen into a link-map
// namespace of its own, where those names cannot meet. RTLD_DEEPBIND alone is not
// enough: sentencepiece's std::cerr would then bind to libstdc++'s copy, which the
// binary's copy relocation leaves unconstructed (a log line would crash).
//
// Nothing allocated on one side is freed on the other (each namespace has its own
// libc and libstdc++), and no exception crosses: results stay in the module's
// thread-local buffers until the same thread's next call; the caller copies them.
#pragma once

#include <stddef.h>

extern "C" {

#define LONGLORA_SPM_ABI 1

struct LongloraSpmApi {
  int abi;  // LONGLORA_SPM_ABI
  // A processor for the model file, or null with the reason in error().
  void* (*load)(const char* path);
  void (*destroy)(void* processor);
  // 0 on success; the ids or text in *out until this thread's next call.
  int (*encode)(const void* processor, const char* text, size_t size, const int** out, size_t* count);
  int (*decode)(const void* processor, const int* ids, size_t count, const char** out, size_t* size);
  int (*id_to_piece)(const void* processor, int id, const char** out, size_t* size);
  int (*bos_id)(const void* processor);
  int (*eos_id)(const void* processor);
  int (*piece_size)(const void* processor);
  // The message of this thread's last failure.
  const char* (*error)(void);
};

// The one symbol the module exports.
typedef const LongloraSpmApi* (*LongloraSpmEntry)(void);
#define LONGLORA_SPM_ENTRY "longlora_spm_api"
}
