// Where a training step's time goes, op by op: one call of f under LibTorch's Kineto
// profiler, summarised as two tables. On a GPU: device time per kernel, and device
// time per ATen op that launched it (the innermost op open on the launching thread).
// On the CPU: self time per op (its time minus the ops it called).
#pragma once

#include <functional>
#include <string>

namespace longlora::train {

// Markdown tables of the `top` largest rows; runs f exactly once. `cuda`: record the
// GPU's kernels too (f runs on a CUDA device).
std::string profile_tables(const std::function<void()>& f, int top, bool cuda);

}  // namespace longlora::train
