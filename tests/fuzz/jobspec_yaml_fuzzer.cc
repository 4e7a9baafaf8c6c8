// libFuzzer target: job YAML as `ftune submit` reads it. ParseJobSpecYaml must
// return a spec or errors (each naming a key or the YAML problem), never crash,
// hang or throw; a spec that parses is resolved (defaults + validation +
// absolute paths) as LoadJobSpec does, and resolving is idempotent.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "jobspec.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  ftune::v1::JobSpec spec;
  std::vector<std::string> errors;
  const bool ok = ftune::ParseJobSpecYaml(text, &spec, &errors);
  if (ok != errors.empty()) __builtin_trap();
  for (const std::string& e : errors) {
    if (e.empty()) __builtin_trap();
  }
  if (!ok) return 0;
  const ftune::Status st = ftune::ResolveJobSpec(&spec, "/home/user/jobs");
  if (!st.ok()) {
    if (st.code() != ftune::StatusCode::kInvalidArgument || st.message().empty()) __builtin_trap();
    return 0;
  }
  const std::string once = spec.SerializeAsString();
  if (!ftune::ResolveJobSpec(&spec, "/home/user/jobs").ok()) __builtin_trap();
  if (spec.SerializeAsString() != once) __builtin_trap();
  (void)ftune::JobSpecToYaml(spec);
  return 0;
}
