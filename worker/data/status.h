// Errors of the data pipeline (tokenizer files, datasets).
// The type is the shared ftune::Status / ftune::Result (common/ftune/status.h),
// visible unqualified inside ftune::data; the macro keeps the module's name.
#ifndef FTUNE_WORKER_DATA_STATUS_H_
#define FTUNE_WORKER_DATA_STATUS_H_

#include "ftune/status.h"

#define FTUNE_DATA_RETURN_IF_ERROR(expr) FTUNE_STATUS_RETURN_IF_ERROR(expr)

#endif  // FTUNE_WORKER_DATA_STATUS_H_
