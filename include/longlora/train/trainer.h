// The LongLoRA training loop: LoRA + trainable embed/norm, S2-Attn, mixed
// precision, checkpoints and exact resume.
#pragma once

#include <string>

#include "longlora/train/config.h"

namespace longlora::train {

struct ResumeRequest {
  bool latest = false;   // newest complete checkpoint in output.dir
  std::string from;      // a given checkpoint directory
};

// Checks what the schema cannot (paths exist, seq_len fits the S2 grouping).
void validate_for_training(const RunConfig& c, const std::string& source);

// Runs to train.max_steps (or a signal); returns the exit code.
int train(const RunConfig& c, const ResumeRequest& resume);

}  // namespace longlora::train
