// Selective recompute: what a checkpointed decoder layer keeps of its
// forward so that the recompute in its backward skips the costly GEMMs.
//
// A checkpointed layer (model.cc) runs its forward without a graph and
// keeps only its input; its backward runs the layer again with a graph and
// differentiates it. With a GemmOutputStash the first forward also keeps
// the outputs of the frozen projections' GEMMs named by its RecomputeKeep,
// in the order they ran, and the recompute takes them back in that order
// instead of multiplying again: it rebuilds the same autograd graph (each
// GEMM's node saves what its backward needs, its weight is dequantized for
// that backward as before), so gradients are identical, and only the
// elementwise work, attention and the unkept GEMMs run twice. This is
// torchtitan's selective "op" policy, applied per projection site.
//
// The GEMMs that take part are the NF4 projections' (Nf4Linear, and the
// fused q/k/v and gate/up GEMMs of fused_projection.h): each asks
// GemmStashReplaying() before multiplying and calls GemmStashTake() instead,
// or multiplies and calls GemmStashPut() with its finished output. Outside
// a record or replay scope, or outside a GemmSiteScope whose site the
// stash's RecomputeKeep covers, both are no-ops and the GEMM runs as usual.
//
// Checks: a kept output modified in place after it was kept fails the
// layer's forward (GemmOutputStash::CheckUnmodified); a recompute that
// asks for an output of another shape, asks for more than were kept, or
// leaves some unused fails with the counts.
//
// Thread-safety: the scopes are per thread (the forward and the backward
// of one layer each run on one thread).
#ifndef FTUNE_WORKER_TRAINER_RECOMPUTE_H_
#define FTUNE_WORKER_TRAINER_RECOMPUTE_H_

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "worker/modelio/recompute_keep.h"

namespace ftune::trainer {

// Where in the layer a GEMM runs.
enum class GemmSite { kAttention, kMlpIn, kDownProj };

// The outputs one checkpointed layer keeps.
class GemmOutputStash {
 public:
  explicit GemmOutputStash(RecomputeKeep keep) : keep_(keep) {}
  // To replay `kept`, the outputs a record scope left (in order).
  GemmOutputStash(RecomputeKeep keep, std::vector<at::Tensor> kept)
      : keep_(keep), outputs_(std::move(kept)) {}

  RecomputeKeep keep() const { return keep_; }
  bool Covers(GemmSite site) const;
  const std::vector<at::Tensor>& outputs() const { return outputs_; }
  // Fails (c10::Error) when a kept output was modified in place since it
  // was kept.
  void CheckUnmodified() const;
  // Fails unless a replay took every kept output.
  void CheckAllTaken() const;

  // Used by the GEMMs through the free functions below.
  void Put(const at::Tensor& y);
  at::Tensor Take(at::IntArrayRef sizes, c10::ScalarType dtype);

 private:
  RecomputeKeep keep_;
  std::vector<at::Tensor> outputs_;
  std::vector<int64_t> versions_;
  size_t taken_ = 0;
};

// While alive, the GEMMs on this thread keep their outputs in `stash`.
class RecordGemmOutputs {
 public:
  explicit RecordGemmOutputs(GemmOutputStash* stash);
  ~RecordGemmOutputs();
  RecordGemmOutputs(const RecordGemmOutputs&) = delete;
  RecordGemmOutputs& operator=(const RecordGemmOutputs&) = delete;

 private:
  GemmOutputStash* previous_;
  bool previous_replay_;
};

// While alive, the GEMMs on this thread take their outputs from `stash`.
class ReplayGemmOutputs {
 public:
  explicit ReplayGemmOutputs(GemmOutputStash* stash);
  ~ReplayGemmOutputs();
  ReplayGemmOutputs(const ReplayGemmOutputs&) = delete;
  ReplayGemmOutputs& operator=(const ReplayGemmOutputs&) = delete;

 private:
  GemmOutputStash* previous_;
  bool previous_replay_;
};

// Marks the GEMMs run while alive as `site`'s. Scopes nest; the innermost
// counts.
class GemmSiteScope {
 public:
  explicit GemmSiteScope(GemmSite site);
  ~GemmSiteScope();
  GemmSiteScope(const GemmSiteScope&) = delete;
  GemmSiteScope& operator=(const GemmSiteScope&) = delete;

 private:
  int previous_;
};

// For the GEMMs: true when this GEMM's output is to be taken, not computed.
bool GemmStashReplaying();
// The kept output in place of this GEMM's: `sizes` and `dtype` are what the
// GEMM would have produced. Only when GemmStashReplaying().
at::Tensor GemmStashTake(at::IntArrayRef sizes, c10::ScalarType dtype);
// Keeps `y`, this GEMM's finished output, when recording at a covered site.
void GemmStashPut(const at::Tensor& y);

// How many kept outputs recomputes in this process have taken in place of
// a GEMM (all threads): what a test or a benchmark checks the sites by.
int64_t KeptGemmOutputsTaken();

}  // namespace ftune::trainer

#endif  // FTUNE_WORKER_TRAINER_RECOMPUTE_H_
