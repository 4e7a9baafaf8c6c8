// libFuzzer target: the agent's spool recovery. The agent reopens events.log
// after a crash, a full disk or disk corruption; whatever the file holds,
// Spool::Open must recover a valid prefix (or refuse with an error), never
// crash, hang or allocate without bound, and the spool it opens must keep its
// invariants: unacked events in strictly increasing seq above the ack, an
// Append numbered above all of them, and a reopen that drops nothing the
// spool wrote itself.
//
// Input: byte 0 holds flags (bit 0: the rest is events.log as is; bit 1:
// write an `acked` file holding the next 8 bytes as a signed decimal). Else
// the rest is records the harness frames with a correct CRC so that fuzzing
// gets past the checksum: each is [kind][8-byte LE agent_seq][length n][n
// payload bytes]; the payload is parsed as a RankEvent (an empty one when it
// does not parse) and given the seq; kind bit 0 corrupts the CRC, bit 1
// writes the payload bytes as they are, bit 2 cuts the record short.
#include <stdlib.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <string>
#include <string_view>

#include "ftune/file_util.h"
#include "worker/agent/spool.h"

namespace {

using ftune::agent::Spool;
using ftune::v1::RankEvent;

const std::string& Dir() {
  static const std::string* dir = [] {
    char tmpl[] = "/dev/shm/spool_fuzzer.XXXXXX";
    char tmpl_tmp[] = "/tmp/spool_fuzzer.XXXXXX";
    char* made = mkdtemp(tmpl);
    if (made == nullptr) made = mkdtemp(tmpl_tmp);
    if (made == nullptr) __builtin_trap();
    // libFuzzer ends with exit(): leave no spool behind in /dev/shm.
    atexit([] { std::filesystem::remove_all(Dir()); });
    return new std::string(made);
  }();
  return *dir;
}

class Reader {
 public:
  Reader(const uint8_t* data, size_t size) : p_(data), left_(size) {}
  bool Take(void* out, size_t n) {
    if (left_ < n) return false;
    memcpy(out, p_, n);
    p_ += n;
    left_ -= n;
    return true;
  }
  size_t left() const { return left_; }

 private:
  const uint8_t* p_;
  size_t left_;
};

void AppendVarint(uint64_t v, std::string* out) {
  while (v >= 0x80) {
    out->push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  out->push_back(static_cast<char>(v));
}

std::string FramedLog(Reader* in) {
  std::string log;
  uint8_t kind, n;
  int64_t seq;
  while (in->Take(&kind, 1) && in->Take(&seq, 8) && in->Take(&n, 1)) {
    std::string payload(n, '\0');
    if (!in->Take(payload.data(), n)) break;
    if ((kind & 2) == 0) {
      RankEvent event;
      if (!event.ParseFromString(payload)) event.Clear();
      event.set_agent_seq(seq);
      payload = event.SerializeAsString();
    }
    std::string record;
    AppendVarint(payload.size(), &record);
    record += payload;
    uint32_t crc = ftune::agent::Crc32(record.data(), record.size());
    if (kind & 1) crc ^= 1;
    for (int i = 0; i < 4; ++i) record.push_back(static_cast<char>(crc >> (8 * i)));
    if (kind & 4) record.resize(record.size() / 2);
    log += record;
  }
  return log;
}

void Check(bool ok) {
  if (!ok) __builtin_trap();
}

// Unacked events in strictly increasing seq above the ack, as many as counted.
void CheckIndex(const Spool& spool) {
  auto events = spool.ReadAfter(0, SIZE_MAX, SIZE_MAX);
  Check(events.ok());
  Check(events->size() == spool.num_unacked());
  int64_t prev = spool.acked_seq();
  for (const RankEvent& e : *events) {
    Check(e.agent_seq() > prev);
    prev = e.agent_seq();
  }
  Check(prev <= spool.last_seq());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const std::string& dir = Dir();
  Reader in(data + 1, size - 1);
  const uint8_t flags = data[0];
  unlink((dir + "/acked").c_str());
  if (flags & 2) {
    int64_t acked = 0;
    in.Take(&acked, 8);
    Check(ftune::WriteFileAtomically(dir + "/acked", std::to_string(acked) + "\n").ok());
  }
  std::string log;
  if (flags & 1) {
    log.resize(in.left());
    in.Take(log.data(), log.size());
  } else {
    log = FramedLog(&in);
  }
  Check(ftune::WriteFileAtomically(dir + "/events.log", log).ok());

  Spool::Options options;
  options.dir = dir;
  options.agent_id = "fuzz";
  auto spool = Spool::Open(options);
  if (!spool.ok()) {
    Check(!spool.status().message().empty());
    return 0;
  }
  CheckIndex(**spool);
  const int64_t last = (*spool)->last_seq();
  RankEvent event;
  event.set_job_id("job");
  const absl::Status appended = (*spool)->Append(&event);
  if (appended.ok()) {
    Check(event.agent_seq() > last && (*spool)->last_seq() == event.agent_seq());
  } else {
    Check((*spool)->last_seq() == last);
  }
  CheckIndex(**spool);
  const size_t num_unacked = (*spool)->num_unacked();
  spool->reset();

  // Recovering what the spool wrote itself drops nothing.
  auto again = Spool::Open(options);
  Check(again.ok());
  Check((*again)->num_unacked() == num_unacked);
  CheckIndex(**again);
  Check((*again)->Ack((*again)->last_seq()).ok());
  Check((*again)->num_unacked() == 0);
  return 0;
}
