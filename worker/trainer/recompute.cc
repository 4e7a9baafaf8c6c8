// Kept GEMM outputs of checkpointed layers; see recompute.h.
#include "worker/trainer/recompute.h"

#include <ATen/ATen.h>

#include <atomic>

namespace ftune::trainer {
namespace {

thread_local GemmOutputStash* active_stash = nullptr;
thread_local bool active_replay = false;
thread_local int active_site = -1;  // a GemmSite, or -1 outside every site
std::atomic<int64_t> taken_total{0};

// The stash this GEMM uses, or null.
GemmOutputStash* SiteStash() {
  if (active_stash == nullptr || active_site < 0) return nullptr;
  return active_stash->Covers(static_cast<GemmSite>(active_site)) ? active_stash : nullptr;
}

}  // namespace

bool GemmOutputStash::Covers(GemmSite site) const {
  switch (keep_) {
    case RecomputeKeep::kNothing:
      return false;
    case RecomputeKeep::kDownProj:
      return site == GemmSite::kDownProj;
    case RecomputeKeep::kAllProjections:
      return true;
  }
  return false;
}

void GemmOutputStash::Put(const at::Tensor& y) {
  outputs_.push_back(y);
  versions_.push_back(static_cast<int64_t>(y._version()));
}

void GemmOutputStash::CheckUnmodified() const {
  for (size_t i = 0; i < outputs_.size() && i < versions_.size(); ++i) {
    TORCH_CHECK(static_cast<int64_t>(outputs_[i]._version()) == versions_[i],
                "selective recompute: kept GEMM output ", i, " of ", outputs_.size(),
                " was modified in place after it was kept (version ", versions_[i], " -> ",
                outputs_[i]._version(), "); the recompute would read wrong values");
  }
}

at::Tensor GemmOutputStash::Take(at::IntArrayRef sizes, c10::ScalarType dtype) {
  TORCH_CHECK(taken_ < outputs_.size(), "selective recompute: the recompute ran more kept GEMMs (",
              taken_ + 1, ") than the forward kept (", outputs_.size(),
              "); the layer must run the same GEMMs both times");
  const at::Tensor& y = outputs_[taken_];
  TORCH_CHECK(y.sizes() == sizes && y.scalar_type() == dtype,
              "selective recompute: GEMM ", taken_, " of the recompute wants ", sizes, " ", dtype,
              ", the forward kept ", y.sizes(), " ", y.scalar_type());
  ++taken_;
  taken_total.fetch_add(1, std::memory_order_relaxed);
  // A new tensor over the same storage: the GEMM's autograd function makes
  // it its output, which must not touch the kept tensor itself.
  return y.detach();
}

void GemmOutputStash::CheckAllTaken() const {
  TORCH_CHECK(taken_ == outputs_.size(), "selective recompute: the recompute used ", taken_,
              " of the ", outputs_.size(), " GEMM outputs the forward kept");
}

RecordGemmOutputs::RecordGemmOutputs(GemmOutputStash* stash)
    : previous_(active_stash), previous_replay_(active_replay) {
  active_stash = stash;
  active_replay = false;
}
RecordGemmOutputs::~RecordGemmOutputs() {
  active_stash = previous_;
  active_replay = previous_replay_;
}

ReplayGemmOutputs::ReplayGemmOutputs(GemmOutputStash* stash)
    : previous_(active_stash), previous_replay_(active_replay) {
  active_stash = stash;
  active_replay = true;
}
ReplayGemmOutputs::~ReplayGemmOutputs() {
  active_stash = previous_;
  active_replay = previous_replay_;
}

GemmSiteScope::GemmSiteScope(GemmSite site) : previous_(active_site) {
  active_site = static_cast<int>(site);
}
GemmSiteScope::~GemmSiteScope() { active_site = previous_; }

bool GemmStashReplaying() { return active_replay && SiteStash() != nullptr; }

at::Tensor GemmStashTake(at::IntArrayRef sizes, c10::ScalarType dtype) {
  GemmOutputStash* stash = SiteStash();
  TORCH_CHECK(active_replay && stash != nullptr,
              "GemmStashTake outside a replay of a kept GEMM site");
  return stash->Take(sizes, dtype);
}

void GemmStashPut(const at::Tensor& y) {
  if (active_replay) return;
  if (GemmOutputStash* stash = SiteStash()) stash->Put(y);
}

int64_t KeptGemmOutputsTaken() { return taken_total.load(std::memory_order_relaxed); }

}  // namespace ftune::trainer
