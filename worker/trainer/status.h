// Errors of the trainer (safetensors, configs, model, optimizer).
// The type is the shared ftune::Status / ftune::Result (common/ftune/status.h),
// visible unqualified inside ftune::trainer; the macro keeps the module's name.
#ifndef FTUNE_WORKER_TRAINER_STATUS_H_
#define FTUNE_WORKER_TRAINER_STATUS_H_

#include "ftune/status.h"

#define FTUNE_TRAINER_RETURN_IF_ERROR(expr) FTUNE_STATUS_RETURN_IF_ERROR(expr)
#define FTUNE_TRAINER_ASSIGN_OR_RETURN(lhs, expr) FTUNE_STATUS_ASSIGN_OR_RETURN(lhs, expr)

#endif  // FTUNE_WORKER_TRAINER_STATUS_H_
