// `longlora-train export`: a training checkpoint (or a peft adapter directory)
// written as a Hugging Face model with the LoRA merged in, or as a clean peft
// adapter.
//
// merged: W' = W + scale * B @ A for every LoRA target (fp32, cast once to the
// output dtype), modules_to_save tensors replace the base ones, everything else
// is copied (cast). Shards of at most max_shard_size tensor bytes (HF's rule: a
// tensor larger than the limit gets a shard of its own) with
// model.safetensors.index.json, or one model.safetensors when everything fits;
// config.json = the base's with the trained RoPE factor and context; tokenizer
// files and generation_config.json copied.
//
// Streaming: tensors are read memory-mapped and written through the
// safetensors writer's callbacks in row chunks, so memory is a few chunks, not
// the model. The output is built in a hidden temporary directory beside it and
// renamed into place; on any error the temporary directory is removed.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "longlora/io/safetensors.h"

namespace longlora::io {

struct ExportOptions {
  std::string checkpoint;            // checkpoint-STEP or a peft adapter directory
  std::string output;                // the directory to create
  std::string format = "merged";     // merged | peft
  std::string dtype;                 // "" (merged: the base's torch_dtype; peft: as stored) | bf16 | fp16 | fp32
  uint64_t max_shard_size = 5'000'000'000ULL;  // bytes of tensor data per shard
  std::string base;                  // base model dir; default: run_config.json's model.path
  std::optional<double> rope_factor; // default: trainer_state.json's, else the base config's
  bool overwrite = false;
};

// "5GB", "100KB", "1.5MB", "2GiB", "123" or "123B" -> bytes. KB/MB/GB/TB are
// powers of 1000 (as Hugging Face), KiB/MiB/GiB/TiB of 1024; units are
// case-insensitive. Throws longlora::Error naming `what` for anything else or 0.
uint64_t parse_size(const std::string& s, const std::string& what = "--max-shard-size");

// Throws longlora::Error (one line naming the file and field) on bad input;
// nothing is left at or beside `output` after an error. Checked before anything is
// written: the base model and a full fine-tuning checkpoint as eval loads them
// (tensors against config.json); the adapter's factors against its r and
// target_modules, and against the base when it is known; an output that is or
// contains the checkpoint or the base model is refused, --overwrite or not.
void export_checkpoint(const ExportOptions& opt);

// The config.json text of a model directory whose weights are stored as `dtype`
// (a full fine-tuning checkpoint's; built as a merged export's is): the config.json at
// `template_path` with only torch_dtype (and dtype, when given) set and, when
// `rope_factor` differs from the template's, its linear RoPE fields (rope_scaling or
// the transformers-5 rope_parameters) set to it. Everything else is kept as written:
// an eos_token_id list, pad_token_id, fields this tool does not read.
std::string model_dir_config(const std::string& template_path, DType dtype, double rope_factor);

}  // namespace longlora::io
