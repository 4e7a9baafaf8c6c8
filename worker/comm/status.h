// Errors of the collectives: a timeout is DEADLINE_EXCEEDED, a dead peer
// UNAVAILABLE, a communicator broken by an earlier failure ABORTED.
// The type is the shared ftune::Status / ftune::Result (common/ftune/status.h),
// visible unqualified inside ftune::comm; the macro keeps the module's name.
#ifndef FTUNE_WORKER_COMM_STATUS_H_
#define FTUNE_WORKER_COMM_STATUS_H_

#include "ftune/status.h"

#define FTUNE_COMM_RETURN_IF_ERROR(expr) FTUNE_STATUS_RETURN_IF_ERROR(expr)

#endif  // FTUNE_WORKER_COMM_STATUS_H_
