// The LongLoRA training loop: LoRA + trainable embed/norm, S2-Attn, mixed
// precision, checkpoints and exact resume.
#pragma once

#include <optional>
#include <string>

#include "longlora/train/config.h"

namespace longlora::train {

struct ResumeRequest {
  bool latest = false;   // newest complete checkpoint in output.dir
  std::string from;      // a given checkpoint directory
};

// Checks what the schema cannot (paths exist, output.dir can be one, seq_len fits the
// S2 grouping, then setup.h's preflight: what the model and data files must agree
// with); warns of a warmup as long as the run. `--dry-run` stops after it.
void validate_for_training(const RunConfig& c, const ConfigOrigin& origin);

// The checkpoint the run starts from (none: step 0). Refuses an output.dir whose
// complete checkpoints this run's would mix with: any, for a new run; newer ones
// than the checkpoint resumed.
std::optional<std::string> plan_start(const RunConfig& c, const ResumeRequest& resume);

// Runs to train.max_steps (or a signal); returns the exit code.
int train(const RunConfig& c, const ResumeRequest& resume);

// Refuses, as a run would, an output.dir whose .lock another run holds (--dry-run).
void refuse_if_in_use(const std::string& dir);

}  // namespace longlora::train
