// Device and dtype choices shared by every command.
#pragma once

#include <torch/torch.h>

#include <string>

namespace longlora {

// "auto" | "cpu" | "cuda": auto picks CUDA when a device is present.
torch::Device pick_device(const std::string& name);
// "auto" (bf16 on GPU, fp32 on CPU) | "fp32" | "bf16" | "fp16".
torch::ScalarType pick_dtype(const std::string& name, const torch::Device& device);
std::string dtype_string(torch::ScalarType t);

// All the memory of the device in GiB: a GPU's total, the machine's RAM for the CPU.
double device_memory_gib(const torch::Device& d);

// Peak memory in GiB: on a GPU what the caching allocator has reserved at its
// peak (what the device really held, fragmentation included); on the CPU the
// process's peak resident set.
double peak_memory_gib(const torch::Device& d);
// Peak of the bytes tensors really held (GPU); the CPU figure as above.
double peak_allocated_gib(const torch::Device& d);

}  // namespace longlora
