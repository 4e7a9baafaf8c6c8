// Merging a LoRA adapter into its base model: `ftune-rank export --merged`.
//
// The result is a plain dense Llama directory transformers loads with
// AutoModelForCausalLM.from_pretrained, as PEFT's merge_and_unload() +
// save_pretrained would write it: every adapted projection becomes
//   W' = dtype(fp32(W) + scaling * (B @ A))
// in W's stored dtype (bf16 for Llama checkpoints), which is what PEFT's
// merge does with fp32 adapters over a bf16 base (delta in fp32, one
// rounding on the in-place add). Every other tensor is copied byte for byte;
// config.json, tokenizer and generation files are copied unchanged.
//
// Memory: the base is processed one safetensors file at a time (its shard
// layout and index are kept), so peak host memory is one shard plus one
// projection in fp32, never the whole model.
//
// The base must be the dense directory the adapter was trained from (the
// one `ftune-rank quantize` started from when training used a pre-quantized
// copy): merging into NF4 weights would bake their quantization error in.
//
// Thread-safety: a free function; any thread.
#ifndef FTUNE_WORKER_TRAINER_MERGE_H_
#define FTUNE_WORKER_TRAINER_MERGE_H_

#include <cstdint>
#include <functional>
#include <string>

#include "ftune/status.h"

namespace ftune::trainer {

struct MergeOptions {
  std::string model_dir;    // dense HF Llama directory (the adapter's base)
  std::string adapter_dir;  // PEFT adapter directory
  std::string out_dir;      // created if missing; its parent must exist
  // Called once per written file with a line for the user.
  std::function<void(const std::string&)> progress;
};

struct MergeReport {
  int64_t merged_projections = 0;  // weights that received a LoRA delta
  int64_t copied_tensors = 0;
  int64_t files_written = 0;
  int64_t bytes_written = 0;
};

// INVALID_ARGUMENT when the base is a 4-bit checkpoint, when an adapter
// tensor has no projection of the right shape in the base, or when the
// adapter has tensors the base does not use.
Result<MergeReport> MergeAdapter(const MergeOptions& options);

}  // namespace ftune::trainer

#endif  // FTUNE_WORKER_TRAINER_MERGE_H_
