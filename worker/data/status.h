// Errors of the data pipeline (tokenizer files, datasets).
// The type itself is the shared ftune::Status (common/ftune/status.h); this
// header names it inside ftune::data and keeps the module's macro names.
#ifndef FTUNE_WORKER_DATA_STATUS_H_
#define FTUNE_WORKER_DATA_STATUS_H_

#include "ftune/status.h"

namespace ftune::data {

using ::ftune::Status;
using ::ftune::StatusCode;
using ::ftune::StatusCodeName;
using ::ftune::Result;
using ::ftune::BadResultAccess;
using ::ftune::OkStatus;
using ::ftune::InvalidArgumentError;
using ::ftune::NotFoundError;
using ::ftune::OutOfRangeError;
using ::ftune::FailedPreconditionError;
using ::ftune::DataLossError;
using ::ftune::DeadlineExceededError;
using ::ftune::UnavailableError;
using ::ftune::AbortedError;
using ::ftune::InternalError;

}  // namespace ftune::data

#define FTUNE_DATA_RETURN_IF_ERROR(expr) FTUNE_STATUS_RETURN_IF_ERROR(expr)

#endif  // FTUNE_WORKER_DATA_STATUS_H_
