// ftune::Status -> absl::Status at the control plane's edge (coordinator,
// agent, CLI), which speaks absl/gRPC statuses; the codes are the same
// canonical codes, the message is kept. Header-only; only code that links
// abseil includes it.
//
// Thread-safety: pure functions.
#ifndef FTUNE_COMMON_FTUNE_ABSL_STATUS_H_
#define FTUNE_COMMON_FTUNE_ABSL_STATUS_H_

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "ftune/status.h"

namespace ftune {

inline absl::Status ToAbsl(const Status& s) {
  if (s.ok()) return absl::OkStatus();
  absl::StatusCode code = absl::StatusCode::kInternal;
  switch (s.code()) {
    case StatusCode::kOk: code = absl::StatusCode::kOk; break;
    case StatusCode::kInvalidArgument: code = absl::StatusCode::kInvalidArgument; break;
    case StatusCode::kNotFound: code = absl::StatusCode::kNotFound; break;
    case StatusCode::kOutOfRange: code = absl::StatusCode::kOutOfRange; break;
    case StatusCode::kFailedPrecondition: code = absl::StatusCode::kFailedPrecondition; break;
    case StatusCode::kDataLoss: code = absl::StatusCode::kDataLoss; break;
    case StatusCode::kDeadlineExceeded: code = absl::StatusCode::kDeadlineExceeded; break;
    case StatusCode::kUnavailable: code = absl::StatusCode::kUnavailable; break;
    case StatusCode::kAborted: code = absl::StatusCode::kAborted; break;
    case StatusCode::kInternal: code = absl::StatusCode::kInternal; break;
  }
  return absl::Status(code, s.message());
}

template <typename T>
absl::StatusOr<T> ToAbsl(Result<T> r) {
  if (!r.ok()) return ToAbsl(r.status());
  return std::move(r).value();
}

}  // namespace ftune

#endif  // FTUNE_COMMON_FTUNE_ABSL_STATUS_H_
