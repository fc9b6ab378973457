// Synthetic long-context text for the CPU demo and smoke runs: documents in the
// exact form of LongLoRA's passkey prompt (task line, filler, "The pass key is K.
// Remember it. K is the pass key.", filler, question) followed by the answer, so a
// model trained on them learns to retrieve a key from anywhere in its context.
#pragma once

#include <cstdint>
#include <string>

namespace longlora::data {

struct PasskeyCorpusOptions {
  std::string tokenizer;  // tokenizer.model (lengths are measured in its tokens)
  std::string out;        // .jsonl with a "text" field per document
  int64_t docs = 1000;
  int64_t min_tokens = 64, max_tokens = 256;  // target length of each document
  uint64_t seed = 0;
};

// Writes the corpus; returns the number of documents.
int64_t write_passkey_corpus(const PasskeyCorpusOptions& o);

}  // namespace longlora::data
