// Synthetic long-context text for the CPU demo and smoke runs: documents in the
// exact form of LongLoRA's passkey prompt (task line, filler, "The pass key is K.
// Remember it. K is the pass key.", filler, question) followed by the answer, so a
// model trained on them learns to retrieve a key from anywhere in its context.
#pragma once

#include <cstdint>
#include <string>

namespace longlora::data {

// The longest document --max-tokens / --row-tokens may ask for (the filler of each is
// built as one string, about 4 characters a token).
constexpr int64_t kMaxDocumentTokens = int64_t{1} << 22;

struct PasskeyCorpusOptions {
  std::string tokenizer;  // tokenizer.model (lengths are measured in its tokens)
  // .jsonl with a "text" field per document; written aside and renamed into place,
  // so a failed run leaves an existing file untouched. An existing file is refused
  // unless `overwrite`.
  std::string out;
  bool overwrite = false;
  int64_t docs = 1000;
  int64_t min_tokens = 64, max_tokens = 256;  // target length of each document
  // Keys per document, drawn uniformly in [min_keys, max_keys]: each key has its own
  // info line, followed (after filler) by 1..max_asks questions answered with it, before
  // the next key's info line. One key is LongLoRA's prompt; several make a document
  // dense in retrievals (the induction/copy signal a small model needs to learn them).
  int64_t min_keys = 1, max_keys = 1;
  int64_t max_asks = 3;
  // > 0: every document is exactly row_tokens - 2 tokens (min/max_tokens unused), so
  // the trainer's packing (BOS doc EOS, cut into rows of row_tokens) gives rows that
  // are whole documents: no key is cut off from its question by a row boundary.
  int64_t row_tokens = 0;
  // This fraction of the documents are copy drills instead: a random string of
  // letters and digits written again and again on its own line. Every repetition is
  // predictable only by looking back and copying, which is what grows the induction
  // (copy) heads passkey retrieval rests on; a small model trained on passkey
  // documents alone (a few copied keys in hundreds of tokens) does not grow them
  // within the CPU demo's budget.
  double copy_frac = 0;
  uint64_t seed = 0;
};

// Writes the corpus; returns the number of documents.
int64_t write_passkey_corpus(const PasskeyCorpusOptions& o);

}  // namespace longlora::data
