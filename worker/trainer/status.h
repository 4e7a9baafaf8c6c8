// Errors of the trainer (safetensors, configs, model, optimizer).
// The type itself is the shared ftune::Status (common/ftune/status.h); this
// header names it inside ftune::trainer and keeps the module's macro names.
#ifndef FTUNE_WORKER_TRAINER_STATUS_H_
#define FTUNE_WORKER_TRAINER_STATUS_H_

#include "ftune/status.h"

namespace ftune::trainer {

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

}  // namespace ftune::trainer

#define FTUNE_TRAINER_RETURN_IF_ERROR(expr) FTUNE_STATUS_RETURN_IF_ERROR(expr)
#define FTUNE_TRAINER_ASSIGN_OR_RETURN(lhs, expr) FTUNE_STATUS_ASSIGN_OR_RETURN(lhs, expr)

#endif  // FTUNE_WORKER_TRAINER_STATUS_H_
