// JobSpec <-> YAML, defaults and validation: the one place where a job
// specification is resolved. Every consumer goes through the same two
// functions:
//   LoadJobSpec(path, base_dir)   the CLI (`ftune submit`, `ftune data`) and
//                                 `ftune-rank train`: read the YAML, make its
//                                 paths absolute, apply defaults, validate;
//   ResolveJobSpec(&spec)         a spec that arrived parsed (the
//                                 coordinator's CreateJob, a rank launched by
//                                 an agent, the trainer's API): defaults and
//                                 validation.
// A resolved spec is what the worker's RunConfig (worker/config) is derived
// from, once. Depends only on protobuf, yaml-cpp and common/'s Status, so
// the trainer reads the same YAML.
//
// YAML keys are the JobSpec field names, which follow HF TrainingArguments,
// PEFT LoraConfig and BitsAndBytesConfig:
//
//   name: llama3-8b-guanaco
//   model: {model_name_or_path: /models/Meta-Llama-3-8B}
//   dataset: {data_files: [train.jsonl], format: text}
//   lora: {r: 16, lora_alpha: 32, lora_dropout: 0.05}
//   quantization: {load_in_4bit: true, bnb_4bit_use_double_quant: true}
//   fsdp: {sharding_strategy: FULL_SHARD, offload_params: false}
//   training: {learning_rate: 2.0e-4, max_steps: 100, gradient_accumulation_steps: 4}
//   resources: {num_ranks: 4, gpus_per_host: 4, min_gpu_memory: 40GiB}
//
// Thread-safe: all functions are pure.
#ifndef FTUNE_PROTO_JOBSPEC_H_
#define FTUNE_PROTO_JOBSPEC_H_

#include <cstdint>
#include <string>
#include <vector>

#include "ftune/status.h"
#include "ftune/v1/job.pb.h"

namespace ftune {

// Reads the YAML file at `path`, makes its relative paths absolute against
// `base_dir` (the directory the user ran the command in; "" leaves them),
// applies the defaults and validates. INVALID_ARGUMENT lists every problem,
// one per line, each prefixed with the path: "job.yaml: lora.r (0) must be in
// [1, 4096]". NOT_FOUND when the file cannot be read.
Result<v1::JobSpec> LoadJobSpec(const std::string& path, const std::string& base_dir);

// Defaults and validation of a spec that is already parsed; paths made
// absolute against `base_dir` when it is not empty. Idempotent. On error the
// spec is left defaulted and the status (INVALID_ARGUMENT) lists every
// problem, one per line.
Status ResolveJobSpec(v1::JobSpec* spec, const std::string& base_dir = "");

// Parses YAML text into *spec (cleared first). Unknown keys, wrong types and
// unparsable values are errors; each names the key path and the bad value,
// e.g. "training.learning_rate: expected a number, got 'fast'".
// Returns true when there were no errors. Does not apply defaults or validate.
bool ParseJobSpecYaml(const std::string& yaml_text, v1::JobSpec* spec,
                      std::vector<std::string>* errors);

// Reads and parses a YAML file; a file that cannot be read is an error.
bool LoadJobSpecFile(const std::string& path, v1::JobSpec* spec,
                     std::vector<std::string>* errors);

// Renders a spec as YAML in the same layout ParseJobSpecYaml reads.
std::string JobSpecToYaml(const v1::JobSpec& spec);

// Fills every unset field with its default (documented in README's job
// reference; mostly HF / PEFT / bitsandbytes defaults). Idempotent.
void ApplyJobSpecDefaults(v1::JobSpec* spec);

// Checks a spec (after defaults) and returns one message per problem, each
// naming the key and the offending value:
//   "training.gradient_accumulation_steps (0) must be >= 1"
// Empty when the spec is valid.
std::vector<std::string> ValidateJobSpec(const v1::JobSpec& spec);

// Makes the spec's relative file paths (model.model_name_or_path,
// dataset.data_files, dataset.eval_data_files, output_dir) absolute against
// base_dir, the directory the user submitted from: ranks run elsewhere (the
// agent's work dir, another host) and must not resolve them against their
// own working directory. Absolute and empty paths are left alone.
void MakeSpecPathsAbsolute(v1::JobSpec* spec, const std::string& base_dir);

// Parses "40GiB", "80 GB", "512MiB", "1073741824" into bytes; false if not a size.
bool ParseByteSize(const std::string& text, int64_t* bytes);
// 42949672960 -> "40GiB" (exact binary units when possible).
std::string FormatByteSize(int64_t bytes);

// "5-7" -> [5, 7], "5" -> [5, 5]: a 1-based inclusive range of optimizer
// steps (training.profile_steps). False when the text is not one.
bool ParseStepRange(const std::string& text, int64_t* first, int64_t* last);

// The LoRA target modules ftune knows (Llama projections).
const std::vector<std::string>& KnownLoraTargets();

}  // namespace ftune

#endif  // FTUNE_PROTO_JOBSPEC_H_
