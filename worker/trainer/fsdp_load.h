// Sliced loading for FSDP: load -> quantize -> shard, each rank touching
// only its own slices of the frozen model. LoadShardedModel builds the
// model without frozen bytes, describes its units (fsdp_units.h has the
// shard layout), fills this rank's shards and installs the FsdpUnits.
//
// Loading. Each rank reads only its element range of each tensor with pread
// (SafetensorsModel::ReadElements: nothing is mapped, so no file pages count
// in RSS; the page cache is the kernel's), converts it to the compute dtype
// and quantizes it, one tensor at a time. Random weights
// (ModelOptions::random_weights) are generated where they will live instead,
// by a CUDA kernel on a GPU, with init-model's bytes. Peak host RSS is its
// shard plus about one tensor's share; LoadStats reports it. glibc keeps
// freed chunks below its (adaptive) mmap threshold in the heap, which would
// let the temporaries of successive tensors pile up in RSS, so the loader
// hands free heap pages back (malloc_trim) after each tensor. Before any
// data moves, the ranks compare their unit layouts (and ShardedLora its
// flat layout): a rank given another model or options fails with
// FAILED_PRECONDITION instead of running mismatched collectives.
//
// Double quantization. bitsandbytes' nested offset is the mean of the WHOLE
// tensor's block absmax, summed in torch's CUDA reduction order
// (kernels/nf4.h), which no combination of per-rank partial sums
// reproduces bit for bit. So loading all-gathers each nested tensor's fp32
// absmax (numel / 16 bytes, one tensor at a time), and every rank runs the
// same double quantization on the same whole vector and keeps its slice:
// the gathered bytes are identical to QuantizeNf4Weight of the whole tensor
// (tests/fsdp/fsdp_test.cc, FsdpNf4BytesTest, checks it byte for byte).
//
// Thread-safety: one thread at a time (the communicator's rule). The
// Communicator must outlive the model.
#ifndef FTUNE_WORKER_TRAINER_FSDP_LOAD_H_
#define FTUNE_WORKER_TRAINER_FSDP_LOAD_H_

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>

#include "worker/comm/communicator.h"
#include "worker/trainer/fsdp_units.h"
#include "worker/trainer/model.h"
#include "worker/trainer/nf4_linear.h"
#include "ftune/status.h"

namespace ftune::trainer {

struct LoadStats {
  int64_t peak_rss_bytes = 0;   // VmHWM at the end of loading (the mark is reset at its start)
  int64_t start_rss_bytes = 0;  // VmRSS when loading started
  int64_t end_rss_bytes = 0;    // VmRSS when it returned
  int64_t shard_bytes = 0;      // this rank's frozen shards, all units
  int64_t largest_tensor_bytes = 0;  // the largest tensor in the compute dtype (the bound's "one tensor")
  int64_t read_bytes = 0;       // bytes this rank read from the safetensors files
  int64_t unit_count = 0;
  double seconds = 0;
};

// load -> quantize -> shard for one rank. comm == nullptr or comm->size() ==
// 1: whole units on this rank, same math as LlamaModel::Load. Reads only
// this rank's byte ranges of the safetensors files. Every rank of `comm`
// must call it with the same arguments. A collective failure returns its
// Status (code kept, message prefixed with what was being loaded).
Result<std::unique_ptr<LlamaModel>> LoadShardedModel(const std::string& model_dir,
                                                    const ModelOptions& options,
                                                    const FsdpOptions& fsdp,
                                                    comm::Communicator* comm,
                                                    LoadStats* stats = nullptr);

// One rank's quantized part of an NF4 tensor, each piece padded to the
// geometry's piece size (uint8 tensors of exactly the *PieceBytes of
// Nf4ShardGeometry).
struct Nf4ShardPieces {
  at::Tensor packed;   // uint8 (PackedPieceBytes)
  at::Tensor absmax;   // uint8 (AbsmaxPieceBytes): fp32 values when not nested
  at::Tensor absmax2;  // uint8 (Absmax2PieceBytes), fp32 values; undefined when not nested
  at::Tensor offset;   // fp32 (1), the whole tensor's nested offset; undefined when not nested
};

// Quantizes this rank's elements `part` (1-D, ElementEnd - ElementBegin of
// `rank`, compute dtype, on the device) of an NF4 tensor. Nested: all-gathers
// the fp32 block absmax of the tensor over `comm` (a collective: every rank
// calls it, in the same order) and double-quantizes the whole vector. `name`
// names the tensor in errors. comm may be nullptr when g.world == 1.
Result<Nf4ShardPieces> QuantizeNf4Part(const at::Tensor& part, const Nf4ShardGeometry& g,
                                       int rank, comm::Communicator* comm,
                                       const std::string& name);

// The whole Nf4Weight of shape (out, in) from every rank's pieces (an
// AllGather per segment), the inverse of QuantizeNf4Part. For tests and
// consolidation; the training path gathers whole units instead.
Result<Nf4Weight> GatherNf4Pieces(const Nf4ShardPieces& mine, const Nf4ShardGeometry& g,
                                  int64_t out_features, int64_t in_features,
                                  comm::Communicator* comm);

}  // namespace ftune::trainer

#endif  // FTUNE_WORKER_TRAINER_FSDP_LOAD_H_
