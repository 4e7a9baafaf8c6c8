// JobSpec -> DatasetOptions: the only place where the job specification's
// dataset and training fields become data-pipeline options, used by
// `ftune data prepare`, the agent and the trainer alike. Kept out of
// ftune_data so that the data library itself needs no protobuf.
//
//   spec.model.model_name_or_path     -> tokenizer_dir (tokenizer.json, tokenizer_config.json)
//   spec.dataset.data_files           -> data_files
//   spec.dataset.eval_data_files      -> eval_data_files
//   spec.dataset.format               -> format              (default "auto")
//   spec.dataset.chat_template        -> chat_template       (default "auto")
//   spec.dataset.eval_split_ratio     -> eval_split_ratio
//   spec.dataset.skip_invalid         -> skip_invalid
//   spec.dataset.completion_only_loss -> completion_only_loss (default true)
//   spec.training.max_seq_len         -> max_seq_len         (default 1024)
//   spec.training.packing             -> packing
//   spec.training.seed                -> seed                (default 42)
// Defaults are proto/jobspec.h's ApplyJobSpecDefaults (applied to a copy);
// ValidateJobSpec's messages about these fields are returned as one error.
//
// Thread-safety: pure function.
#ifndef FTUNE_WORKER_DATA_FROM_SPEC_H_
#define FTUNE_WORKER_DATA_FROM_SPEC_H_

#include "ftune/v1/job.pb.h"
#include "worker/data/prepare.h"

namespace ftune::data {

Result<DatasetOptions> DatasetOptionsFromSpec(const ftune::v1::JobSpec& spec);

}  // namespace ftune::data

// The trainer's spelling (the API agreed with the lead): ::DatasetOptionsFromSpec.
using ftune::data::DatasetOptionsFromSpec;

#endif  // FTUNE_WORKER_DATA_FROM_SPEC_H_
