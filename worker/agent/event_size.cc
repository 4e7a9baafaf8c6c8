#include "worker/agent/event_size.h"

#include <google/protobuf/descriptor.h>
#include <google/protobuf/message.h>
#include <google/protobuf/reflection.h>

#include "absl/strings/str_cat.h"

namespace ftune::agent {
namespace {

using google::protobuf::FieldDescriptor;

}  // namespace

bool TruncateString(std::string* s, size_t max_bytes) {
  if (s->size() <= max_bytes) return false;
  const size_t total = s->size();
  size_t cut = max_bytes;
  // Back off to the first byte of a UTF-8 sequence (continuation bytes are
  // 10xxxxxx): proto3 strings must stay valid UTF-8.
  while (cut > 0 && (static_cast<unsigned char>((*s)[cut]) & 0xC0) == 0x80) --cut;
  s->resize(cut);
  absl::StrAppend(s, " [... truncated by ftune-agent: ", total, " bytes in all]");
  return true;
}

int TruncateStrings(google::protobuf::Message* msg, size_t max_bytes) {
  const auto* desc = msg->GetDescriptor();
  const auto* refl = msg->GetReflection();
  int cut = 0;
  for (int i = 0; i < desc->field_count(); ++i) {
    const FieldDescriptor* f = desc->field(i);
    if (f->type() == FieldDescriptor::TYPE_STRING) {
      if (f->is_repeated()) {
        for (int j = 0; j < refl->FieldSize(*msg, f); ++j) {
          std::string s = refl->GetRepeatedString(*msg, f, j);
          if (TruncateString(&s, max_bytes)) {
            refl->SetRepeatedString(msg, f, j, std::move(s));
            ++cut;
          }
        }
      } else if (refl->HasField(*msg, f)) {
        std::string s = refl->GetString(*msg, f);
        if (TruncateString(&s, max_bytes)) {
          refl->SetString(msg, f, std::move(s));
          ++cut;
        }
      }
    } else if (f->cpp_type() == FieldDescriptor::CPPTYPE_MESSAGE) {
      if (f->is_repeated()) {
        for (int j = 0; j < refl->FieldSize(*msg, f); ++j)
          cut += TruncateStrings(refl->MutableRepeatedMessage(msg, f, j), max_bytes);
      } else if (refl->HasField(*msg, f)) {
        cut += TruncateStrings(refl->MutableMessage(msg, f), max_bytes);
      }
    }
  }
  return cut;
}

std::string FitEvent(v1::RankEvent* event) {
  std::string what;
  if (const int n = TruncateStrings(event, kMaxEventStringBytes); n > 0)
    what = absl::StrCat(n, " string(s) over ", kMaxEventStringBytes, " bytes truncated");
  if (event->ByteSizeLong() <= kMaxEventBytes) return what;
  // Only a message with many long strings gets here. The stderr tail is the
  // first thing to go: the payload's own words matter more.
  const size_t before = event->ByteSizeLong();
  if (event->has_exit()) event->mutable_exit()->clear_stderr_tail();
  if (event->has_message() && event->message().has_error())
    event->mutable_message()->mutable_error()->clear_stderr_tail();
  if (event->has_launch_failed()) event->mutable_launch_failed()->clear_stderr_tail();
  if (event->ByteSizeLong() > kMaxEventBytes) {
    // An exit must keep its code; anything else becomes an error in its place.
    const std::string message = absl::StrCat("ftune-agent: dropped a rank message of ", before,
                                             " bytes (over the ", kMaxEventBytes,
                                             "-byte limit of one event)");
    if (event->has_exit()) {
      v1::RankExit exit;
      exit.set_exit_code(event->exit().exit_code());
      exit.set_hung(event->exit().hung());
      *event->mutable_exit() = std::move(exit);
    } else {
      event->mutable_message()->mutable_error()->set_message(message);
    }
  }
  return absl::StrCat(what, what.empty() ? "" : "; ", "event of ", before, " bytes cut to ",
                      event->ByteSizeLong(), " (limit ", kMaxEventBytes, ")");
}

}  // namespace ftune::agent
