// Size limits on what a rank may put into one event, applied by the agent
// before the event is spooled (docs/security.md, "Limits").
//
// A rank is not trusted to keep its messages small: one multi-megabyte log
// line or error text must not become a record the spool, the coordinator's
// gRPC limit or a watcher cannot take. So every string of an event is cut
// to kMaxEventStringBytes (at a UTF-8 character boundary, with a marker
// saying how long it was), and an event still over kMaxEventBytes after
// that loses its stderr tail, or else its payload, for a short error saying
// what was dropped. Spool::Append refuses anything larger, so no event the
// agent sends is bigger than kMaxEventBytes, and no batch bigger than the
// agent's max_batch_bytes (or one event, if that is larger).
//
// Thread-safety: pure functions.
#ifndef FTUNE_WORKER_AGENT_EVENT_SIZE_H_
#define FTUNE_WORKER_AGENT_EVENT_SIZE_H_

#include <cstddef>
#include <string>

#include "ftune/v1/agent_service.pb.h"

namespace google::protobuf {
class Message;
}

namespace ftune::agent {

inline constexpr size_t kMaxEventStringBytes = 64 << 10;
inline constexpr size_t kMaxEventBytes = 1 << 20;

// Cuts *s to at most max_bytes of its UTF-8 text plus a marker
// " [... truncated by ftune-agent: N bytes in all]"; false if it fit.
bool TruncateString(std::string* s, size_t max_bytes);

// Applies TruncateString to every string field of msg, nested messages
// included (bytes fields are left alone). Returns how many were cut.
int TruncateStrings(google::protobuf::Message* msg, size_t max_bytes);

// Makes event fit the limits above; returns a description of what was cut
// ("" when nothing was), for the agent's log.
std::string FitEvent(v1::RankEvent* event);

}  // namespace ftune::agent

#endif  // FTUNE_WORKER_AGENT_EVENT_SIZE_H_
