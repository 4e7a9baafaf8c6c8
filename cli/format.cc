// See format.h.
#include "cli/format.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <sstream>
#include <utility>

#include <google/protobuf/util/json_util.h>

#include "cli/table.h"
#include "jobspec.h"

namespace ftune::cli {
namespace {

std::string Printf(const char* fmt, double value) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), fmt, value);
  return buf;
}

// Memory and sizes: a size of 0 means "not measured" in these messages.
std::string Size(int64_t bytes) { return bytes > 0 ? FormatByteSize(bytes) : "-"; }

std::string Who(const v1::JobEvent& event) {
  std::string who = event.rank() < 0 ? "job" : "rank " + std::to_string(event.rank());
  // "rank 12" is 7 wide; keep the payload column steady for up to 100 ranks.
  if (who.size() < 7) who.append(7 - who.size(), ' ');
  return who;
}

std::string EventPayload(const v1::JobEvent& event) {
  std::string s;
  switch (event.payload_case()) {
    case v1::JobEvent::kStateChange: {
      const auto& c = event.state_change();
      s = "state " + JobStateName(c.from()) + " -> " + JobStateName(c.to());
      if (!c.reason().empty()) s += ": " + c.reason();
      break;
    }
    case v1::JobEvent::kStep: {
      const auto& m = event.step();
      s = "step " + std::to_string(m.step()) + "  loss " + FormatFixed(m.loss(), 4) + "  lr " +
          FormatScientific(m.learning_rate()) + "  grad_norm " + FormatFixed(m.grad_norm(), 3) +
          "  tokens/s " + FormatFixed(m.tokens_per_second(), 1);
      if (m.epoch() > 0) s += "  epoch " + FormatFixed(m.epoch(), 2);
      if (m.forward_seconds() > 0 || m.backward_seconds() > 0) {
        s += "  fwd " + FormatFixed(m.forward_seconds(), 3) + "s  bwd " +
             FormatFixed(m.backward_seconds(), 3) + "s  opt " +
             FormatFixed(m.optimizer_seconds(), 3) + "s";
        if (m.exposed_comm_seconds() > 0) {
          s += "  comm_exposed " + FormatFixed(m.exposed_comm_seconds(), 3) + "s";
        }
      }
      break;
    }
    case v1::JobEvent::kMemory: {
      const auto& m = event.memory();
      s = "memory";
      if (!m.phase().empty()) s += " (" + m.phase() + ")";
      s += "  allocated " + Size(m.allocated_bytes()) + "  reserved " + Size(m.reserved_bytes()) +
           "  peak " + Size(m.peak_bytes()) + "  host_rss " + Size(m.host_rss_bytes());
      if (!m.device().empty()) s += "  device " + m.device();
      break;
    }
    case v1::JobEvent::kCheckpoint: {
      const auto& c = event.checkpoint();
      s = "checkpoint step " + std::to_string(c.step()) + "  " + c.path() + "  " + Size(c.bytes()) +
          "  " + FormatFixed(c.duration_seconds(), 1) + "s  " +
          (c.complete() ? "complete" : "partial");
      break;
    }
    case v1::JobEvent::kEval: {
      const auto& e = event.eval();
      s = "eval step " + std::to_string(e.step()) + "  eval_loss " + FormatFixed(e.eval_loss(), 4) +
          "  eval_tokens " + std::to_string(e.eval_tokens());
      break;
    }
    case v1::JobEvent::kLog:
      s = "log " + event.log().level() + "  " + event.log().text();
      break;
    case v1::JobEvent::kError:
      s = "error: " + event.error().message();
      break;
    case v1::JobEvent::kDone: {
      const auto& d = event.done();
      s = "done final_step " + std::to_string(d.final_step()) + "  final_loss " +
          FormatFixed(d.final_loss(), 4);
      if (!d.adapter_path().empty()) s += "  adapter " + d.adapter_path();
      break;
    }
    case v1::JobEvent::PAYLOAD_NOT_SET:
      // A newer coordinator may send payloads this build does not know.
      s = "event of an unknown kind";
      break;
  }
  return s;
}

// Aligned "key: value" block for `describe`.
void KeyValue(std::ostringstream& out, const std::string& key, const std::string& value) {
  constexpr size_t kKeyWidth = 14;
  std::string k = key + ":";
  if (k.size() < kKeyWidth) k.append(kKeyWidth - k.size(), ' ');
  out << k << ' ' << value << '\n';
}

std::string Indent(const std::string& text, const std::string& prefix) {
  std::string out;
  size_t start = 0;
  while (start < text.size()) {
    size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    out += prefix + text.substr(start, end - start) + "\n";
    start = end + 1;
  }
  return out;
}

}  // namespace

std::string JobStateName(v1::JobState state) {
  if (!v1::JobState_IsValid(state)) return "UNKNOWN(" + std::to_string(state) + ")";
  return v1::JobState_Name(state);
}

bool ParseJobState(std::string_view text, v1::JobState* state) {
  std::string upper(text);
  for (char& c : upper) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  v1::JobState parsed;
  if (!v1::JobState_Parse(upper, &parsed) || parsed == v1::JOB_STATE_UNSPECIFIED) return false;
  *state = parsed;
  return true;
}

bool IsFinalState(v1::JobState state) {
  return state == v1::SUCCEEDED || state == v1::FAILED || state == v1::CANCELLED;
}

std::string FormatIsoTime(int64_t unix_ms) {
  if (unix_ms == 0) return "-";
  // Floor division so times before 1970 still print the right second.
  int64_t seconds = unix_ms / 1000;
  if (unix_ms % 1000 < 0) --seconds;
  const std::time_t t = static_cast<std::time_t>(seconds);
  std::tm tm{};
  if (gmtime_r(&t, &tm) == nullptr) return "-";
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

std::string FormatRelativeTime(int64_t unix_ms, int64_t now_ms) {
  if (unix_ms == 0) return "-";
  const int64_t diff_ms = now_ms - unix_ms;
  const int64_t abs_s = (diff_ms < 0 ? -diff_ms : diff_ms) / 1000;
  if (abs_s < 1) return "just now";
  std::string amount;
  if (abs_s < 60) {
    amount = std::to_string(abs_s) + "s";
  } else if (abs_s < 3600) {
    amount = std::to_string(abs_s / 60) + "m";
  } else if (abs_s < 86400) {
    amount = std::to_string(abs_s / 3600) + "h";
  } else {
    amount = std::to_string(abs_s / 86400) + "d";
  }
  return diff_ms >= 0 ? amount + " ago" : "in " + amount;
}

std::string FormatTimestamp(int64_t unix_ms, int64_t now_ms) {
  if (unix_ms == 0) return "-";
  return FormatIsoTime(unix_ms) + " (" + FormatRelativeTime(unix_ms, now_ms) + ")";
}

std::string FormatFixed(double value, int decimals) {
  if (std::isnan(value)) return "nan";
  if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
  char fmt[16];
  std::snprintf(fmt, sizeof(fmt), "%%.%df", std::clamp(decimals, 0, 12));
  return Printf(fmt, value);
}

std::string FormatScientific(double value) {
  if (std::isnan(value)) return "nan";
  if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
  return Printf("%.3e", value);
}

std::string FormatEvent(const v1::JobEvent& event) {
  std::string line = FormatIsoTime(event.time_unix_ms()) + " " + Who(event) + "  " +
                     EventPayload(event);
  if (event.attempt() > 0) line += "  [attempt " + std::to_string(event.attempt()) + "]";
  line += '\n';
  if (event.has_error()) {
    for (const std::string& tail : event.error().stderr_tail()) line += "    | " + tail + "\n";
  }
  return line;
}

std::string FormatJobsTable(const std::vector<v1::Job>& jobs, int64_t now_ms) {
  TextTable table(
      {"ID", "NAME", "OWNER", "STATE", "RANKS", "STEP", "LOSS", "RESTARTS", "AGE", "REASON"});
  for (size_t c : {4, 5, 6, 7}) table.SetAlign(c, TextTable::Align::kRight);
  for (const v1::Job& job : jobs) {
    table.AddRow({job.id(), job.spec().name().empty() ? "-" : job.spec().name(),
                  job.owner().empty() ? "-" : job.owner(), JobStateName(job.state()), std::to_string(job.spec().resources().num_ranks()),
                  job.last_step() > 0 ? std::to_string(job.last_step()) : "-",
                  job.last_step() > 0 ? FormatFixed(job.last_loss(), 4) : "-",
                  std::to_string(job.restarts()),
                  FormatRelativeTime(job.create_time_unix_ms(), now_ms), job.state_reason()});
  }
  return table.Render();
}

std::string FormatJobDetails(const v1::Job& job, int64_t now_ms) {
  std::ostringstream out;
  KeyValue(out, "id", job.id());
  KeyValue(out, "name", job.spec().name().empty() ? "-" : job.spec().name());
  KeyValue(out, "owner", job.owner().empty() ? "-" : job.owner());
  KeyValue(out, "state", JobStateName(job.state()));
  KeyValue(out, "reason", job.state_reason().empty() ? "-" : job.state_reason());
  KeyValue(out, "created", FormatTimestamp(job.create_time_unix_ms(), now_ms));
  KeyValue(out, "updated", FormatTimestamp(job.update_time_unix_ms(), now_ms));
  std::string restarts = std::to_string(job.restarts());
  if (job.spec().has_max_restarts()) {
    restarts += " of at most " + std::to_string(job.spec().max_restarts());
  }
  KeyValue(out, "restarts", restarts);
  KeyValue(out, "last step", job.last_step() > 0 ? std::to_string(job.last_step()) : "-");
  KeyValue(out, "last loss", job.last_step() > 0 ? FormatFixed(job.last_loss(), 4) : "-");
  KeyValue(out, "last event", std::to_string(job.last_event_seq()));
  KeyValue(out, "adapter", job.adapter_path().empty() ? "-" : job.adapter_path());
  KeyValue(out, "memory plan",
           job.planned_device_bytes() > 0 ? Size(job.planned_device_bytes()) + " per rank"
                                          : "- (model config not readable by the coordinator)");
  KeyValue(out, "request id", job.request_id().empty() ? "-" : job.request_id());
  // std::map orders the labels, so the output does not depend on hashing.
  std::map<std::string, std::string> labels(job.spec().labels().begin(),
                                            job.spec().labels().end());
  std::string label_text;
  for (const auto& [key, value] : labels) {
    if (!label_text.empty()) label_text += ", ";
    label_text += key + "=" + value;
  }
  KeyValue(out, "labels", label_text.empty() ? "-" : label_text);
  if (job.placement_size() == 0) {
    KeyValue(out, "placement", "-");
  } else {
    out << "placement:\n";
    TextTable table({"RANK", "HOST", "SLOT", "AGENT"});
    table.SetAlign(0, TextTable::Align::kRight);
    table.SetAlign(2, TextTable::Align::kRight);
    for (const v1::RankPlacement& p : job.placement()) {
      table.AddRow({std::to_string(p.rank()), p.host(), std::to_string(p.slot()), p.agent_id()});
    }
    out << Indent(table.Render(), "  ");
  }
  out << "spec:\n" << Indent(JobSpecToYaml(job.spec()), "  ");
  return out.str();
}

std::string FormatCheckpointsTable(const std::vector<v1::Checkpoint>& checkpoints,
                                   int64_t now_ms) {
  TextTable table({"STEP", "SIZE", "COMPLETE", "CREATED", "PATH"});
  table.SetAlign(0, TextTable::Align::kRight);
  table.SetAlign(1, TextTable::Align::kRight);
  for (const v1::Checkpoint& c : checkpoints) {
    table.AddRow({std::to_string(c.step()), Size(c.bytes()), c.complete() ? "yes" : "no",
                  FormatRelativeTime(c.create_time_unix_ms(), now_ms), c.path()});
  }
  return table.Render();
}

std::string FormatAgentsTable(const std::vector<v1::Agent>& agents, int64_t now_ms) {
  TextTable table({"AGENT", "HOST", "STATE", "SLOTS", "JOBS", "DEVICES", "LAST SEEN"});
  for (const v1::Agent& agent : agents) {
    // Group identical devices: "8x NVIDIA H100 80GB HBM3 (79.6GiB)".
    std::vector<std::pair<std::string, int>> devices;
    for (const v1::Slot& slot : agent.slots()) {
      std::string name = slot.name().empty() ? "slot" : slot.name();
      if (slot.memory_bytes() > 0) name += " (" + FormatByteSize(slot.memory_bytes()) + ")";
      auto it = std::find_if(devices.begin(), devices.end(),
                             [&](const auto& d) { return d.first == name; });
      if (it == devices.end()) {
        devices.emplace_back(name, 1);
      } else {
        ++it->second;
      }
    }
    std::string device_text;
    for (const auto& [name, count] : devices) {
      if (!device_text.empty()) device_text += ", ";
      device_text += std::to_string(count) + "x " + name;
    }
    // Jobs holding slots here, in order of first appearance.
    std::vector<std::string> jobs;
    for (const v1::RankPlacement& used : agent.used())
      if (!used.job_id().empty() &&
          std::find(jobs.begin(), jobs.end(), used.job_id()) == jobs.end())
        jobs.push_back(used.job_id());
    std::string job_text;
    for (const auto& j : jobs) job_text += (job_text.empty() ? "" : ",") + j;
    table.AddRow({agent.agent_id(), agent.host(), agent.alive() ? "alive" : "dead",
                  std::to_string(agent.used_size()) + "/" + std::to_string(agent.slots_size()) +
                      " used",
                  job_text.empty() ? "-" : job_text, device_text.empty() ? "-" : device_text,
                  FormatRelativeTime(agent.last_seen_unix_ms(), now_ms)});
  }
  return table.Render();
}

std::string FormatOutcome(const v1::Job& job) {
  std::string s = "job " + job.id() + " " + JobStateName(job.state());
  if (!job.state_reason().empty()) s += ": " + job.state_reason();
  return s;
}

std::string ToJsonLine(const google::protobuf::Message& message) {
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;
  std::string json;
  if (!google::protobuf::util::MessageToJsonString(message, &json, options).ok()) {
    // Only reachable with invalid UTF-8 in a string field; keep the stream
    // line-oriented rather than dropping the event silently.
    return "{\"error\":\"message could not be rendered as JSON\"}";
  }
  return json;
}

void RunSummary::Add(const v1::JobEvent& event) {
  if (event.attempt() > attempt_) {
    attempt_ = event.attempt();
    tokens_per_second_.clear();
  }
  const bool current = event.attempt() == attempt_;
  switch (event.payload_case()) {
    case v1::JobEvent::kStep:
      max_step_ = std::max(max_step_, event.step().step());
      if (current) {
        tokens_per_second_[event.rank()] = event.step().tokens_per_second();
        // Rank 0 speaks for the job when ranks disagree (each reports its
        // local batch loss); other ranks fill in until rank 0 is heard.
        if (event.rank() == 0 || !have_loss_) last_loss_ = event.step().loss();
        have_loss_ = true;
      }
      break;
    case v1::JobEvent::kMemory:
      peak_bytes_ = std::max(peak_bytes_, event.memory().peak_bytes());
      break;
    case v1::JobEvent::kDone:
      if (current && !event.done().adapter_path().empty()) {
        adapter_path_ = event.done().adapter_path();
      }
      if (current) {
        max_step_ = std::max(max_step_, event.done().final_step());
        last_loss_ = event.done().final_loss();
        have_loss_ = true;
      }
      break;
    default:
      break;
  }
}

std::string RunSummary::Format(const v1::Job& job) const {
  // The job record is what the coordinator settled on; events fill the gaps.
  const int64_t steps = job.last_step() > 0 ? job.last_step() : max_step_;
  std::string loss = "-";
  if (job.last_step() > 0) {
    loss = FormatFixed(job.last_loss(), 4);
  } else if (have_loss_) {
    loss = FormatFixed(last_loss_, 4);
  }
  std::string tokens = "-";
  if (!tokens_per_second_.empty()) {
    double sum = 0;
    for (const auto& [rank, rate] : tokens_per_second_) sum += rate;
    tokens = FormatFixed(sum, 1);
  }
  std::string adapter = !job.adapter_path().empty() ? job.adapter_path() : adapter_path_;
  return "summary: steps " + (steps > 0 ? std::to_string(steps) : std::string("-")) +
         ", final loss " + loss + ", tokens/s " + tokens + ", peak memory " + Size(peak_bytes_) +
         ", adapter " + (adapter.empty() ? "-" : adapter);
}

}  // namespace ftune::cli
