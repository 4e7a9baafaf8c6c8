// Status: the error value every ftune::comm call returns.
//
// Why not absl::Status: the trainer links this library and must build on a
// GPU host without abseil (ARCHITECTURE.md). Why not exceptions: a collective
// that fails is an expected event (a peer died), which the caller must handle
// on every call site; Gloo's and NCCL's own errors (exceptions, result codes)
// are caught at this library's boundary and never cross it.
//
// The codes are the canonical ones the control plane uses, so a rank's error
// maps onto the job's failure reason without a translation table.
//
// Thread-safety: a value type; a const Status may be read from any thread.
#ifndef FTUNE_WORKER_COMM_STATUS_H_
#define FTUNE_WORKER_COMM_STATUS_H_

#include <string>
#include <string_view>
#include <utility>

namespace ftune::comm {

enum class StatusCode {
  kOk = 0,
  kInvalidArgument,     // a caller's arguments are wrong (null buffer, root)
  kDeadlineExceeded,    // a collective or the rendezvous ran past its timeout
  kUnavailable,         // a peer's connection closed: the peer died
  kAborted,             // the communicator was aborted by an earlier failure
  kFailedPrecondition,  // the environment does not allow the call
  kInternal,            // an OS, CUDA or NCCL call failed
};

std::string_view StatusCodeName(StatusCode code);

class Status {
 public:
  Status() = default;  // OK
  Status(StatusCode code, std::string message)
      : code_(code), message_(std::move(message)) {}

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }
  // "DEADLINE_EXCEEDED: gloo AllReduce #3 ..." (or "OK").
  std::string ToString() const;

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

inline Status OkStatus() { return Status(); }

inline std::string_view StatusCodeName(StatusCode code) {
  switch (code) {
    case StatusCode::kOk:
      return "OK";
    case StatusCode::kInvalidArgument:
      return "INVALID_ARGUMENT";
    case StatusCode::kDeadlineExceeded:
      return "DEADLINE_EXCEEDED";
    case StatusCode::kUnavailable:
      return "UNAVAILABLE";
    case StatusCode::kAborted:
      return "ABORTED";
    case StatusCode::kFailedPrecondition:
      return "FAILED_PRECONDITION";
    case StatusCode::kInternal:
      return "INTERNAL";
  }
  return "UNKNOWN";
}

inline std::string Status::ToString() const {
  if (ok()) return "OK";
  std::string out(StatusCodeName(code_));
  out += ": ";
  out += message_;
  return out;
}

}  // namespace ftune::comm

// Early return of a non-OK ftune::comm::Status. Named FTUNE_COMM_* so it never
// meets absl's or the trainer's macros in one translation unit.
#define FTUNE_COMM_RETURN_IF_ERROR(expr)                     \
  do {                                                       \
    ::ftune::comm::Status ftune_comm_status_ = (expr);       \
    if (!ftune_comm_status_.ok()) return ftune_comm_status_; \
  } while (false)

#endif  // FTUNE_WORKER_COMM_STATUS_H_
