// FSDP for QLoRA: the frozen model sharded across the ranks of a job, the
// LoRA adapters and their gradients sharded ZeRO-style. Three parts, each
// with its design note:
//   fsdp_units.h  the unit runtime: one flat shard per unit (NF4 pieces and
//                 dense elements), gather -> compute -> free around each
//                 unit, prefetch, re-gather in backward, timing;
//   fsdp_load.h   sliced loading: each rank reads (or generates) only its
//                 slices of each tensor and quantizes them into its shards;
//   fsdp_lora.h   the sharded LoRA state: flat fp32 shard, per-layer
//                 gradient reduction hooks, clipping, all-gather of the
//                 updated shard.
// fsdp_streams.h (streams, lanes, the collective clock) and fsdp_common.h
// are internal to the library.
//
// The order of a rank's setup: LoadShardedModel (load -> quantize ->
// shard, installs the FsdpUnits) -> AttachLora / LoadAdapter ->
// ShardedLora::Create -> AdamW over ShardedLora::shard().
//
// Thread-safety: one thread at a time (the rank's training thread; the
// communicator's rule). The Communicator must outlive the model and the
// ShardedLora.
#ifndef FTUNE_WORKER_TRAINER_FSDP_H_
#define FTUNE_WORKER_TRAINER_FSDP_H_

#include "worker/trainer/fsdp_load.h"
#include "worker/trainer/fsdp_lora.h"
#include "worker/trainer/fsdp_units.h"

#endif  // FTUNE_WORKER_TRAINER_FSDP_H_
