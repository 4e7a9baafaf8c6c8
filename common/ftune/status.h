// Status and Result<T>: the error type of the worker-side modules (trainer,
// collectives, data pipeline), which must build on GPU hosts that have no
// abseil (docs/architecture.md). One type for all of them, so errors cross
// module boundaries unchanged. Codes and their text follow absl/gRPC canonical
// codes. The control plane uses absl::Status instead.
//
// Thread-safety: values; no shared state.
#ifndef FTUNE_COMMON_FTUNE_STATUS_H_
#define FTUNE_COMMON_FTUNE_STATUS_H_

#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>

namespace ftune {

enum class StatusCode {
  kOk = 0,
  kInvalidArgument,     // a caller's request or a config value is wrong
  kNotFound,            // a file, shard or tensor does not exist
  kOutOfRange,          // a byte/element range outside a tensor
  kFailedPrecondition,  // a request that the object's state does not allow
  kDataLoss,            // a file's bytes are malformed or truncated
  kDeadlineExceeded,    // a collective or a rendezvous ran past its timeout
  kUnavailable,         // a peer's connection closed: the peer died
  kAborted,             // an earlier failure already broke the object
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
  // "DATA_LOSS: model.safetensors: ..." (or "OK").
  std::string ToString() const;

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

inline Status OkStatus() { return Status(); }
inline Status InvalidArgumentError(std::string m) {
  return Status(StatusCode::kInvalidArgument, std::move(m));
}
inline Status NotFoundError(std::string m) {
  return Status(StatusCode::kNotFound, std::move(m));
}
inline Status OutOfRangeError(std::string m) {
  return Status(StatusCode::kOutOfRange, std::move(m));
}
inline Status FailedPreconditionError(std::string m) {
  return Status(StatusCode::kFailedPrecondition, std::move(m));
}
inline Status DataLossError(std::string m) {
  return Status(StatusCode::kDataLoss, std::move(m));
}
inline Status DeadlineExceededError(std::string m) {
  return Status(StatusCode::kDeadlineExceeded, std::move(m));
}
inline Status UnavailableError(std::string m) {
  return Status(StatusCode::kUnavailable, std::move(m));
}
inline Status AbortedError(std::string m) {
  return Status(StatusCode::kAborted, std::move(m));
}
inline Status InternalError(std::string m) {
  return Status(StatusCode::kInternal, std::move(m));
}

// Thrown only by Result::value() on a non-OK Result: reading a value that is
// not there is a programming error, not an input error.
class BadResultAccess : public std::logic_error {
 public:
  explicit BadResultAccess(const Status& s)
      : std::logic_error("Result::value() on error: " + s.ToString()) {}
};

// Either a T or a non-OK Status.
template <typename T>
class Result {
 public:
  Result(T value) : value_(std::move(value)) {}  // NOLINT: implicit by design
  Result(Status status) : status_(std::move(status)) {  // NOLINT
    if (status_.ok()) {
      status_ = InternalError("Result constructed from an OK Status without a value");
    }
  }

  bool ok() const { return value_.has_value(); }
  const Status& status() const { return status_; }

  T& value() & {
    Check();
    return *value_;
  }
  const T& value() const& {
    Check();
    return *value_;
  }
  T&& value() && {
    Check();
    return std::move(*value_);
  }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T&& operator*() && { return std::move(*this).value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

 private:
  void Check() const {
    if (!value_.has_value()) throw BadResultAccess(status_);
  }

  std::optional<T> value_;
  Status status_;  // OK exactly when value_ holds a value
};

inline std::string_view StatusCodeName(StatusCode code) {
  switch (code) {
    case StatusCode::kOk: return "OK";
    case StatusCode::kInvalidArgument: return "INVALID_ARGUMENT";
    case StatusCode::kNotFound: return "NOT_FOUND";
    case StatusCode::kOutOfRange: return "OUT_OF_RANGE";
    case StatusCode::kFailedPrecondition: return "FAILED_PRECONDITION";
    case StatusCode::kDataLoss: return "DATA_LOSS";
    case StatusCode::kDeadlineExceeded: return "DEADLINE_EXCEEDED";
    case StatusCode::kUnavailable: return "UNAVAILABLE";
    case StatusCode::kAborted: return "ABORTED";
    case StatusCode::kInternal: return "INTERNAL";
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

}  // namespace ftune

// Early return of a non-OK Status from a function returning Status or
// Result<T>. Named FTUNE_STATUS_* so they never meet absl's macros in a
// translation unit that includes both (tests, tools).
#define FTUNE_STATUS_RETURN_IF_ERROR(expr)             \
  do {                                                  \
    ::ftune::Status ftune_status_ = (expr);    \
    if (!ftune_status_.ok()) return ftune_status_;      \
  } while (false)

#define FTUNE_STATUS_CONCAT_INNER_(a, b) a##b
#define FTUNE_STATUS_CONCAT_(a, b) FTUNE_STATUS_CONCAT_INNER_(a, b)
#define FTUNE_STATUS_ASSIGN_OR_RETURN(lhs, expr)                             \
  FTUNE_STATUS_ASSIGN_OR_RETURN_IMPL_(                                       \
      FTUNE_STATUS_CONCAT_(ftune_result_, __LINE__), lhs, expr)
#define FTUNE_STATUS_ASSIGN_OR_RETURN_IMPL_(result, lhs, expr) \
  auto result = (expr);                                         \
  if (!result.ok()) return result.status();                     \
  lhs = std::move(result).value()

#endif  // FTUNE_COMMON_FTUNE_STATUS_H_
