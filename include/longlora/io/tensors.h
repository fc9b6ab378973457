// torch views of safetensors entries (zero-copy; the mapping stays alive as long
// as any view does), and the safetensors writer fed from torch tensors.
#pragma once

#include <torch/torch.h>

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "longlora/io/safetensors.h"

namespace longlora::io {

torch::ScalarType to_torch_dtype(DType d);
DType from_torch_dtype(torch::ScalarType t, const std::string& what);

// A read-only CPU view of the entry. `owner` is kept alive by the view.
torch::Tensor view_tensor(const TensorInfo& t, std::shared_ptr<const void> owner);

// torch.save of a plain dict of float tensors, read whole with LibTorch's unpickler
// onto the CPU. An Error naming the file for anything else, with the one-line Python
// re-save for an OrderedDict (a state_dict() saved as it is), which LibTorch cannot read.
std::shared_ptr<SafetensorsFile> read_pickled_tensors(const std::string& path);

// A model checkpoint, a directory or one file: safetensors (mapped) or PyTorch pickles
// (pytorch_model.bin, sharded or not, as transformers saves them; read whole).
std::shared_ptr<SafetensorsCheckpoint> open_checkpoint(const std::string& path);

// Opens a checkpoint and returns every tensor as a view (keeps the files mapped).
std::map<std::string, torch::Tensor> load_tensors(const std::string& path);

// A peft adapter's weights: adapter_model.safetensors, mapped, or else the
// adapter_model.bin of older peft versions and LongLoRA's scripts (torch.save of a
// plain dict), read whole. An Error naming the directory when neither is there.
std::shared_ptr<SafetensorsFile> open_adapter_weights(const std::string& dir);

// LongLoRA's trainable_params.bin beside its adapter: the embedding and norms it
// trained, keyed by the base's names ("model.norm.weight"), which its eval and merge
// scripts load into the base before the adapter. nullptr when the file is absent.
std::shared_ptr<SafetensorsFile> open_trainable_params(const std::string& dir);

// Writes named tensors (any device, contiguous-ified one at a time) to `path`; returns
// the file's size and CRC-32.
FileDigest save_tensors(const std::string& path,
                        const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                        const std::map<std::string, std::string>& metadata = {{"format", "pt"}});

}  // namespace longlora::io
