// Status and Result<T>: the data pipeline's error values.
//
// Why not absl::Status: worker/data is linked by the trainer, which builds on
// GPU hosts without abseil (ARCHITECTURE.md). Why not exceptions: loading
// reads untrusted files (a user's tokenizer.json, datasets) and is fuzzed; a
// value the caller must look at keeps that boundary explicit. The codes are
// the canonical ones the control plane uses, so the agent maps them onto
// absl::Status one to one.
//
// Thread-safety: values; a const Status or Result may be read from any
// thread.
#ifndef FTUNE_WORKER_DATA_STATUS_H_
#define FTUNE_WORKER_DATA_STATUS_H_

#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>

namespace ftune::data {

enum class StatusCode {
  kOk = 0,
  kInvalidArgument,  // a malformed or unsupported input (file contents, flags)
  kNotFound,         // a file that does not exist
  kInternal,         // an OS or library call failed
};

class Status {
 public:
  Status() = default;  // OK
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }
  // "INVALID_ARGUMENT: tokenizer.json: ..." (or "OK").
  std::string ToString() const {
    if (ok()) return "OK";
    std::string_view name = code_ == StatusCode::kInvalidArgument ? "INVALID_ARGUMENT"
                            : code_ == StatusCode::kNotFound      ? "NOT_FOUND"
                                                                  : "INTERNAL";
    return std::string(name) + ": " + message_;
  }

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

inline Status OkStatus() { return Status(); }
inline Status InvalidArgumentError(std::string m) {
  return Status(StatusCode::kInvalidArgument, std::move(m));
}
inline Status NotFoundError(std::string m) { return Status(StatusCode::kNotFound, std::move(m)); }
inline Status InternalError(std::string m) { return Status(StatusCode::kInternal, std::move(m)); }

// Either a T or a non-OK Status. Reading the value of an error is a
// programming error and throws std::logic_error.
template <typename T>
class Result {
 public:
  Result(T value) : value_(std::move(value)) {}  // NOLINT: implicit by design
  Result(Status status) : status_(std::move(status)) {  // NOLINT
    if (status_.ok()) status_ = InternalError("Result built from an OK Status without a value");
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
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

 private:
  void Check() const {
    if (!value_.has_value()) throw std::logic_error("Result::value() on " + status_.ToString());
  }

  std::optional<T> value_;
  Status status_;
};

}  // namespace ftune::data

#define FTUNE_DATA_RETURN_IF_ERROR(expr)          \
  do {                                            \
    ::ftune::data::Status ftune_status_ = (expr); \
    if (!ftune_status_.ok()) return ftune_status_; \
  } while (false)

#endif  // FTUNE_WORKER_DATA_STATUS_H_
